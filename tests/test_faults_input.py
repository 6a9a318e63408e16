"""Faults in the user's input files: wrong encodings, byte order marks, ids that collide.

Each ends in a FusionpipeError that names the file (and the line or both rows) and the fix; through the CLI,
"error: ..." and exit status 1, never a traceback."""

import dataclasses
import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from fusionpipe.cli import app
from fusionpipe.errors import FusionpipeError
from fusionpipe.manifest import Manifest, Utterance, read_manifest, write_manifest
from fusionpipe.corpora.folder import import_folder

REPO = Path(__file__).resolve().parents[1]
HEADER = "id\tpath\tnum_samples\tsample_rate\ttext\n"


def _cli(args, cwd):
    """`python -m fusionpipe ARGS` with this checkout's package, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "fusionpipe", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _fp(args, capsys):
    """(exit code, stderr) of `fusionpipe ARGS` run in this process through main(), as the console script."""
    from fusionpipe.cli import main

    argv, sys.argv = sys.argv, ["fusionpipe", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


def _wav(path, n=1600, rate=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(n, np.float32), rate)


# ---- a. not UTF-8 ------------------------------------------------------------------------------------
def _latin1_manifest(path):
    text = "# root: .\n" + HEADER + "u1\tu1.wav\t1600\t16000\tA\nu2\tu2.wav\t1600\t16000\tcaf\u00e9\n"
    path.write_bytes(text.encode("latin-1"))
    return path


def test_a_non_utf8_manifest_is_an_error_naming_the_file_the_line_and_the_fix(tmp_path):
    bad = _latin1_manifest(tmp_path / "bad.tsv")
    with pytest.raises(FusionpipeError) as e:
        read_manifest(bad)
    msg = str(e.value)
    assert str(bad) in msg and "line 4" in msg and "0xe9" in msg and "save it as UTF-8" in msg


def test_a_non_utf8_manifest_through_the_cli_exits_1_without_a_traceback(tmp_path):
    _latin1_manifest(tmp_path / "bad.tsv")
    p = _cli(["extract", "--manifest", "bad.tsv", "--model", "toy-wavlm"], tmp_path)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.startswith("error: manifest bad.tsv line 4 is not UTF-8") and "save it as UTF-8" in p.stderr


def test_a_utf16_manifest_is_named_as_utf16(tmp_path):
    bad = tmp_path / "excel.tsv"
    bad.write_bytes(("# root: .\n" + HEADER + "u1\tu1.wav\t1600\t16000\tA\n").encode("utf-16"))
    with pytest.raises(FusionpipeError, match=r"excel.tsv is UTF-16 .*save it as UTF-8"):
        read_manifest(bad)


def test_a_non_utf8_transcript_in_an_audio_folder_is_an_error_naming_it(tmp_path):
    _wav(tmp_path / "corpus" / "u1.wav")
    (tmp_path / "corpus" / "u1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(FusionpipeError, match=r"transcript .*u1.txt line 1 is not UTF-8"):
        import_folder(tmp_path / "corpus")


# ---- b. a UTF-8 byte order mark is accepted, and is the same manifest ------------------------------------------
@pytest.mark.parametrize("root_line", ["# root: audio\n", ""])
def test_b_a_utf8_bom_is_accepted_and_keeps_the_content_hash(tmp_path, root_line):
    text = root_line + HEADER + "u1\tu1.wav\t1600\t16000\tA B\nu2\tu2.wav\t800\t16000\t\n"
    (tmp_path / "plain").mkdir()
    (tmp_path / "bom").mkdir()
    (tmp_path / "plain" / "m.tsv").write_text(text, encoding="utf-8")
    (tmp_path / "bom" / "m.tsv").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    plain, bom = read_manifest(tmp_path / "plain" / "m.tsv"), read_manifest(tmp_path / "bom" / "m.tsv")
    assert bom.utterances == plain.utterances and bom[0].id == "u1"
    assert bom.root.name == ("audio" if root_line else "bom")
    # the store fingerprint records content_hash: a BOM (or CRLF) copy opens the same caches
    assert bom.content_hash() == plain.content_hash()


def test_b_columns_added_later_leave_the_hash_of_a_manifest_without_them_as_it_was(tmp_path):
    """The store fingerprint records content_hash: a new optional column must not invalidate old caches."""
    row = Utterance("u1", "u1.wav", 1600, 16000, speaker="s", text="A B")
    old = hashlib.sha256(("\t".join(["u1", "u1.wav", "1600", "16000", "s", "A B", "", "", ""]) + "\n").encode())
    assert Manifest("m", tmp_path, [row]).content_hash() == old.hexdigest()
    with_phones = Manifest("m", tmp_path, [dataclasses.replace(row, phonemes="EY1 B IY1")])
    with_turns = Manifest("m", tmp_path, [dataclasses.replace(row, turns="0.0,0.1,s")])
    assert len({with_phones.content_hash(), with_turns.content_hash(), old.hexdigest()}) == 3


# ---- c. duplicate ids ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("names,first,second,utt_id", [
    (["a b.flac", "a_b.flac"], "a b.flac", "a_b.flac", "a_b"),
    (["x.wav", "x.flac"], "x.flac", "x.wav", "x"),
    (["s-1.wav", "s/1.wav"], "s/1.wav", "s-1.wav", "s-1"),  # paths sort by their parts
])
def test_c_manifest_folder_refuses_files_that_share_an_id_before_writing(tmp_path, names, first, second, utt_id):
    corpus = tmp_path / "corpus"
    for name in names:
        _wav(corpus / name)
    out = tmp_path / "manifests"
    result = CliRunner().invoke(app, ["manifest", "folder", str(corpus), "--out", str(out)])
    assert isinstance(result.exception, FusionpipeError), result.output
    msg = str(result.exception)
    assert f"{first} and {second} would both get utterance id {utt_id!r}" in msg and "rename" in msg
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_c_manifest_folder_through_the_cli_exits_1_and_writes_nothing(tmp_path):
    for name in ("a b.flac", "a_b.flac", "c.wav"):
        _wav(tmp_path / "corpus" / name)
    p = _cli(["manifest", "folder", "corpus"], tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "a b.flac and a_b.flac would both get utterance id 'a_b'" in p.stderr
    assert not (tmp_path / "manifests").exists()


def test_c_distinct_names_still_import(tmp_path):
    for name in ("a b.flac", "s/1.wav", "x.wav"):
        _wav(tmp_path / "corpus" / name)
    assert [u.id for u in import_folder(tmp_path / "corpus")] == ["a_b", "s-1", "x"]


def test_c_write_manifest_refuses_duplicate_ids_naming_both_rows(tmp_path):
    m = Manifest("m", tmp_path, [Utterance("u", "a.wav", 1, 16000), Utterance("u", "b.wav", 1, 16000)])
    with pytest.raises(FusionpipeError, match=r"a.wav and b.wav both have id 'u'.*m.tsv was not written"):
        write_manifest(m, tmp_path / "m.tsv")
    assert not (tmp_path / "m.tsv").exists() and not (tmp_path / "m.tsv.tmp").exists()


def test_c_read_manifest_refuses_duplicate_ids_naming_both_lines(tmp_path):
    path = tmp_path / "dup.tsv"
    path.write_text("# root: .\n" + HEADER + "u1\ta.wav\t1\t16000\t\nu2\tb.wav\t1\t16000\t\nu1\tc.wav\t1\t16000\t\n")
    with pytest.raises(FusionpipeError, match=r"dup.tsv line 5: duplicate id 'u1', also on line 3; .*rename or remove"):
        read_manifest(path)


# ---- d. packaging floors ---------------------------------------------------------------------------------------
def test_d_declared_floors_are_the_releases_the_code_needs_and_are_installed():
    """transformers 4.56: from_pretrained(dtype=) (4.55 passes it on to the model's __init__ and fails);
    zarr 3.1.6: Array.with_config, atomic chunk writes (3.1.3); dask 2024.12.1: from_zarr of zarr 3 arrays;
    typer 0.15.4: --help with click >= 8.2; zarr 3 needs Python 3.11. Each floor was run (see pyproject.toml)."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert SpecifierSet(project["requires-python"]) == SpecifierSet(">=3.11")
    reqs = {(r := Requirement(d)).name: r for d in project["dependencies"]}
    floors = {"transformers": "4.56", "zarr": "3.1.6", "numcodecs": "0.14", "dask": "2024.12.1", "typer": "0.15.4"}
    for name, floor in floors.items():
        spec = reqs[name].specifier
        assert str(spec) == f">={floor}", (name, str(spec))
        assert Version(version(name)) in spec, f"installed {name} {version(name)} is below the declared {spec}"
    assert not reqs["torch"].specifier  # pin-free: GPU users install their own build first


# ---- resource limits and URLs: refused up front, named ----------------------------------------------
def test_a_chunk_size_past_the_limit_is_refused_before_the_store_is_made(tmp_path, capsys):
    """--chunk-frames 1000000000000 created the store and slept forever."""
    from fusionpipe.manifest import CORPUS

    code, err = _fp(["extract", "--model", "toy-wavlm", "--manifest", str(CORPUS / "demo-dev.tsv"), "--cache",
                     str(tmp_path / "c"), "--device", "cpu", "--chunk-frames", "1000000000000"], capsys)
    assert code == 1 and "--chunk-frames 1000000000000: give a whole number from 1 to" in err
    assert not list((tmp_path / "c").rglob("zarr.json"))


@pytest.mark.parametrize("url", ["s3://bucket/x.zarr", "http://example.invalid/x.zarr"])
def test_a_url_whose_filesystem_is_not_installed_names_the_package(url, capsys):
    pytest.importorskip("fsspec")
    import fsspec

    try:
        fsspec.get_filesystem_class(url.split(":")[0])
        pytest.skip("its filesystem is installed here")
    except ImportError:
        pass
    for args in (["inspect", url], ["verify", url], ["fuse", "--stores", url, "--describe"]):
        code, err = _fp(args, capsys)
        assert code == 1 and "stores need a package that is not installed" in err and "Traceback" not in err, err


def test_a_file_name_manifest_folder_refuses_leaves_no_temporary_file(tmp_path, capsys):
    audio = tmp_path / "audio"
    _wav(audio / "ok.wav")
    _wav(audio / "bad\nname.wav")
    code, err = _fp(["manifest", "folder", str(audio), "--name", "x", "--out", str(tmp_path / "manifests")], capsys)
    assert code == 1 and "tab or newline" in err and "was not written" in err
    assert not (tmp_path / "manifests").exists() or not list((tmp_path / "manifests").iterdir())


def test_a_full_disk_or_an_unwritable_out_in_a_run_is_named(pitch_stores, tmp_path, monkeypatch, capsys):
    from fusionpipe import atomic

    (tmp_path / "file").write_text("")
    args = ["train", "--stores", ",".join(pitch_stores["train"]), "--task", "classify", "--steps", "2",
            "--max-frames", "600", "--device", "cpu"]
    code, err = _fp(args + ["--out", str(tmp_path / "file" / "run")], capsys)
    assert code == 1 and "--out" in err and "is not a writable directory" in err and "Traceback" not in err

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    code, err = _fp(args + ["--out", str(tmp_path / "run")], capsys)
    assert code == 1 and "config.json: the disk is full" in err and "--resume" in err
    assert not list((tmp_path / "run").glob(".*.tmp"))


# ---- flags and targets that turn on the user's own files -----------------------------------------------
def test_fuse_write_onto_one_of_its_own_input_stores_is_refused_and_the_store_survives(
        make_tsv, make_store, random_data, tmp_path, capsys):
    from fusionpipe.store import FeatureStore

    ids = ["a", "b", "c"]
    m = make_tsv(tmp_path / "m.tsv", ids)
    data = random_data(ids, [7, 5, 3], 2, 4, seed=0)
    a = make_store(tmp_path / "a.zarr", data, m, name="up-a")
    make_store(tmp_path / "b.zarr", random_data(ids, [7, 5, 3], 2, 4, seed=1), m, name="up-b")
    before = a.read("a")
    for target in (tmp_path / "a.zarr", tmp_path / "sub" / ".." / "a.zarr", tmp_path, tmp_path / "a.zarr" / "in"):
        code, err = _fp(["fuse", "--stores", f"{tmp_path / 'a.zarr'},{tmp_path / 'b.zarr'}", "--merge", "concat",
                         "--write", str(target), "--overwrite"], capsys)
        assert code == 1 and "--write" in err and "one of the --stores" in err and "Traceback" not in err, err
    np.testing.assert_array_equal(FeatureStore.open(tmp_path / "a.zarr").read("a"), before)


@pytest.mark.parametrize("dtype", ["int8", "bfloat16", "float64"])
def test_extract_an_unsupported_dtype_is_refused_before_the_upstream_loads(dtype, speech_manifest, tmp_path,
                                                                          monkeypatch, capsys):
    import transformers

    def no_load(*a, **k):
        raise AssertionError("the upstream was loaded before --dtype was checked")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_load)
    code, err = _fp(["extract", "--model", "toy-wavlm", "--manifest", str(speech_manifest.source), "--cache",
                     str(tmp_path / "cache"), "--dtype", dtype], capsys)
    assert code == 1 and "--dtype" in err and "float16" in err and "Traceback" not in err, err
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.zarr"))


@pytest.mark.parametrize("flags, words", [
    (["--cluster", "local", "--workers", "0"], "--workers"),
    (["--scheduler", "notaurl"], "--scheduler"),
    (["--scheduler", "tcp://host:notaport"], "--scheduler"),
])
def test_extract_cluster_flags_that_cannot_work_are_refused_up_front(flags, words, speech_manifest, tmp_path,
                                                                       capsys):
    code, err = _fp(["extract", "--model", "toy-wavlm", "--manifest", str(speech_manifest.source), "--cache",
                     str(tmp_path / "cache"), *flags], capsys)
    assert code == 1 and words in err and "Traceback" not in err, err


@pytest.mark.slow
def test_a_two_hour_recording_is_refused_before_extraction_naming_the_row_and_the_fix(tmp_path, capsys):
    """Nothing checked an utterance against memory: a 2-hour file reached the allocator midway (a traceback).
    Its lower-bound estimate (eager attention over 360k frames) exceeds any machine's memory."""
    root = tmp_path / "audio"
    root.mkdir()
    _wav(root / "short.wav")
    silence = np.zeros(16000 * 60, np.int16)
    with sf.SoundFile(root / "long.flac", "w", 16000, 1, subtype="PCM_16") as f:
        for _ in range(120):
            f.write(silence)
    m = tmp_path / "m.tsv"
    m.write_text(f"# root: {root}\n" + HEADER + "short\tshort.wav\t1600\t16000\tA\n"
                 f"long\tlong.flac\t{16000 * 7200}\t16000\tB\n")
    args = ["extract", "--model", "toy-wavlm", "--manifest", str(m), "--cache", str(tmp_path / "cache"),
            "--device", "cpu"]
    code, err = _fp(args, capsys)
    assert code == 1 and "m.tsv" in err and "long" in err and "7,200 s of audio" in err and "GiB" in err, err
    assert "cut the recording" in err and "--skip-bad" in err and "Traceback" not in err
    assert not list((tmp_path / "cache").rglob("c/*"))  # no chunk written: refused before extraction
    code, err = _fp(args + ["--skip-bad"], capsys)  # recorded as skipped, the rest extracted
    assert code == 0, err
    from fusionpipe.store import FeatureStore

    store = FeatureStore.open(next((tmp_path / "cache").rglob("*.zarr")))
    assert store.ids == ["short"] or "long" in store.skipped


def test_the_memory_estimate_is_a_lower_bound_that_grows_with_the_recording():
    from fusionpipe.extract.upstreams import load_upstream

    for name in ("toy-wavlm", "toy-whisper"):
        up = load_upstream(name, device="cpu")
        second, minute = up.peak_bytes(16000), up.peak_bytes(16000 * 60)
        assert 0 < second <= minute
        (h,) = up.forward([np.zeros(16000 * 4, np.float32)])
        assert up.peak_bytes(16000 * 4) >= h.numel() * h.element_size()  # at least the output it returns


def test_running_out_of_memory_in_the_upstream_is_an_error_naming_the_batch_and_the_fix(monkeypatch):
    """What the estimate does not foresee (an sdpa model's long file, a crowded GPU) still ends in a clear error."""
    from fusionpipe.extract.upstreams import load_upstream

    up = load_upstream("toy-hubert", device="cpu")

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 94000000000 bytes")

    monkeypatch.setattr(up, "_run_ssl", no_memory)
    with pytest.raises(FusionpipeError, match=r"ran out of memory on cpu .* 2 utterance\(s\), the longest 1 s.*"
                                              r"--max-seconds"):
        up.forward([np.zeros(16000, np.float32), np.zeros(8000, np.float32)])

    def other(*a, **k):
        raise RuntimeError("a bug, not memory")

    monkeypatch.setattr(up, "_run_ssl", other)
    with pytest.raises(RuntimeError, match="a bug"):  # other errors are not dressed up as memory
        up.forward([np.zeros(16000, np.float32)])
