from fusionpipe.cli import main

main()
