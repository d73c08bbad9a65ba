"""Hostile and careless input to the runtime: crafted states and files, foreign CPUs, untrusted
libraries, a second copy of the runtime library. Each ends as a clear Python exception.

Cases that used to kill the process run in a subprocess (``_isolated``): the test checks its
return code and the message it printed, so a regression fails one test instead of the run.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import tvm

from tvm.contrib.torch import GraphModule, export, runtime_library_path
from tvm.contrib.torch import trust
from conftest import AffineProgram, assert_outputs_close

_HERE = os.path.dirname(os.path.abspath(__file__))
_BLOB = torch.zeros(1, dtype=torch.uint8)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def state_digest(header: dict, blobs) -> str:
    """Python's view of the state's one checksum (state_format.h, StateDigest)."""
    lines = ["tvm.contrib.torch state 2", f"class {header['class']}",
             f"num_inputs {header['num_inputs']}", f"num_outputs {header['num_outputs']}",
             f"device {header['device']}",
             f"bucket_padding {1 if header['bucket_padding'] else 0}",
             f"programs {len(header['programs'])}"]
    for i, program in enumerate(header["programs"]):
        lines.append(f"program {i} graph {_sha(program['graph'].encode())} "
                     f"lib {_sha(bytes(blobs[2 * i].numpy()))} "
                     f"params {_sha(bytes(blobs[2 * i + 1].numpy()))}")
    return _sha(("\n".join(lines) + "\n").encode())


def seal(header: dict, blobs) -> tuple:
    """A version-2 state whose sizes and checksums are recomputed, as an attacker would."""
    header = json.loads(json.dumps(header))
    for i, program in enumerate(header["programs"]):
        lib, params = bytes(blobs[2 * i].numpy()), bytes(blobs[2 * i + 1].numpy())
        program.update(lib_size=len(lib), lib_sha256=_sha(lib), params_size=len(params),
                       params_sha256=_sha(params))
    header["state_sha256"] = state_digest(header, blobs)
    return 2, json.dumps(header), list(blobs)


def _state(program):
    """(version, header dict, blobs) of a module holding ``program`` (or its files' tuple)."""
    files = program if isinstance(program, tuple) else program.files.as_tuple()
    module = GraphModule(num_inputs=1, num_outputs=2)
    module.init([[4, 8]], *files)
    (version, header, blobs), _ = module.engine.__getstate__()
    return version, json.loads(header), blobs


def _isolated(code: str, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (tests' directory importable)."""
    script = os.path.join(str(cwd), "_isolated.py")
    with open(script, "w", encoding="utf-8") as f:
        f.write("import sys\nsys.path.insert(0, %r)\n" % _HERE + textwrap.dedent(code))
    return subprocess.run([sys.executable, script], cwd=str(cwd), capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **(env or {})))


# ---- the state's one checksum ----

def test_the_runtime_sha256_is_sha256():
    sha256 = tvm.get_global_func("tvm_torch.sha256")
    data = bytes(range(256)) * 5
    for size in list(range(0, 130)) + [1000, 1279]:
        assert sha256(data[:size]) == _sha(data[:size]), size


def test_python_and_cpp_agree_on_the_state_digest(cpu_program):
    version, header, blobs = _state(cpu_program)
    assert version == 2
    assert header["state_sha256"] == state_digest(header, blobs)
    assert header["programs"][0]["lib_sha256"] == _sha(bytes(blobs[0].numpy()))
    module = _graph(cpu_program)
    assert trust.library_digests(module) == [header["programs"][0]["lib_sha256"]]
    assert trust.library_digests(torch.jit.script(module)) == trust.library_digests(module)
    with open(cpu_program.files.lib_path, "rb") as f:
        assert header["programs"][0]["lib_sha256"] == _sha(f.read())  # sha256sum NAME.so


def _graph(program):
    module = GraphModule(num_inputs=1, num_outputs=2)
    module.init([program.shape], *program.files.as_tuple())
    return module


def test_a_manifest_with_swapped_params_is_refused(cpu_program):
    _, header, blobs = _state(cpu_program)
    manifest = json.loads(header["programs"][0]["graph"])
    manifest["params"] = list(reversed(manifest["params"]))
    header["programs"][0]["graph"] = json.dumps(manifest)  # per-blob checksums still hold
    fresh = torch.classes.tvm_class.TvmGraphModule(1, 2, "cpu")
    with pytest.raises(RuntimeError, match=r"the header or a program's manifest differs from "
                                           r"what was saved"):
        fresh.load_state((2, json.dumps(header), blobs))
    for field, value in (("device", "cuda:0"), ("bucket_padding", True), ("num_outputs", 3)):
        with pytest.raises(RuntimeError, match=r"differs from what was saved"):
            fresh.load_state((2, json.dumps(dict(header, **{field: value})), blobs))
    assert fresh.signatures() == []


def test_a_resealed_state_loads(cpu_program):
    """The Python view of the format is complete: a state it seals loads and runs."""
    _, header, blobs = _state(cpu_program)
    fresh = torch.classes.tvm_class.TvmGraphModule(1, 2, "cpu")
    fresh.load_state(seal(header, blobs))
    x = torch.randn(4, 8)
    assert_outputs_close(fresh.forward([x]), cpu_program.reference(x))


def test_version_1_states_still_load(cpu_program):
    """States saved before the SHA-256 format (64-bit FNV-1a per blob) load as before."""
    _, header, blobs = _state(cpu_program)

    def fnv(data: bytes) -> str:
        h = 1469598103934665603
        for byte in data:
            h = ((h ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
        return f"{h:016x}"

    old = {k: header[k] for k in ("class", "num_inputs", "num_outputs", "device",
                                  "bucket_padding")}
    old["programs"] = [{"graph": p["graph"], "lib_size": p["lib_size"],
                        "lib_checksum": fnv(bytes(blobs[2 * i].numpy())),
                        "params_size": p["params_size"],
                        "params_checksum": fnv(bytes(blobs[2 * i + 1].numpy()))}
                       for i, p in enumerate(header["programs"])]
    fresh = torch.classes.tvm_class.TvmGraphModule(1, 2, "cpu")
    fresh.load_state((1, json.dumps(old), blobs))
    x = torch.randn(4, 8)
    assert_outputs_close(fresh.forward([x]), cpu_program.reference(x))


@pytest.mark.parametrize("state, message", [
    (None, r"must be a tuple \(format version, header, blobs\), got None"),
    (7, r"must be a tuple .*got Int"),
    ((), r"must be a tuple .*got a tuple of 0 elements"),
    ((2, "{}"), r"must be a tuple .*got a tuple of 2 elements"),
    (("2", "{}", [_BLOB]), r"format version must be an int, got String"),
    ((2, 3, [_BLOB]), r"header must be a string, got Int"),
    ((2, "{}", 5), r"blobs must be a list of tensors, got Int"),
])
def test_states_of_the_wrong_shape_have_clear_messages(state, message):
    fresh = torch.classes.tvm_class.TvmGraphModule(1, 2, "cpu")
    with pytest.raises(RuntimeError, match=message):
        fresh.load_state(state)
    with pytest.raises(RuntimeError, match=message):  # what torch.jit.load calls
        fresh._get_method("__setstate__")(state)


# ---- crashes that are now exceptions ----

def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_json_is_refused(cpu_program, tmp_path):
    proc = _isolated(f"""
        import json, torch
        from tvm.contrib.torch import GraphModule
        from test_security import _state, seal, _nested
        _, header, blobs = _state({cpu_program.files.as_tuple()!r})
        fresh = torch.classes.tvm_class.TvmGraphModule(1, 2, "cpu")
        deep = _nested(200000)
        attempts = [
            ("header", lambda: fresh.load_state((2, deep, blobs))),
            ("class", lambda: fresh.load_state(
                (2, json.dumps(header)[:-1] + ', "class": ' + deep + '}}', blobs))),
            ("manifest", lambda: fresh.load_state(seal(
                dict(header, programs=[dict(header["programs"][0], graph=deep)]), blobs))),
            ("bytes", lambda: GraphModule(1, 2).load_bytes(b"x", deep, b"")),
        ]
        for what, attempt in attempts:
            try:
                attempt()
            except RuntimeError as err:
                print(what, str(err).splitlines()[0])
            else:
                print(what, "loaded")
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 4, proc.stdout
    for line in lines:
        assert "nests deeper than 64 levels" in line, line


def test_truncated_library_with_recomputed_checksums_is_refused(cpu_program, tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = _isolated(f"""
        import torch
        from test_security import _state, seal
        _, header, blobs = _state({cpu_program.files.as_tuple()!r})
        for cut in (2, 10):
            lib = blobs[0][: blobs[0].numel() // cut].clone()
            fresh = torch.classes.tvm_class.TvmGraphModule(1, 2, "cpu")
            try:
                fresh.load_state(seal(header, [lib, blobs[1]]))
            except RuntimeError as err:
                print(str(err).splitlines()[0])
    """, tmp_path, env={"TMPDIR": str(tmpdir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    for line in lines:
        assert "the compiled library is not a complete shared library for this machine" in line
    assert os.listdir(tmpdir) == []  # no temp .so left behind


def test_a_library_path_that_is_not_a_regular_file_is_refused(cpu_program, tmp_path):
    fifo = str(tmp_path / "fifo.so")
    os.mkfifo(fifo)
    paths = ["/dev/zero", fifo, str(tmp_path)]
    files = cpu_program.files
    proc = _isolated(f"""
        from tvm.contrib.torch import GraphModule
        for path in {paths!r}:
            try:
                GraphModule(1, 2).init([[4, 8]], path, {files.graph_path!r},
                                       {files.params_path!r})
            except RuntimeError as err:
                print(str(err).splitlines()[0])
    """, tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in paths:
        assert f"the compiled library file '{path}' is not a regular file" in proc.stdout


def _onednn_libraries() -> list:
    """The oneDNN library the runtime library links (from the onednn-cpu-gomp wheel), if any."""
    try:
        files = importlib.metadata.files("onednn-cpu-gomp") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [str(f.locate().resolve()) for f in files if str(f).endswith("libdnnl.so.3")]


def test_a_second_copy_of_the_runtime_library_is_left_inert(tmp_path):
    copy = tmp_path / "libtvm_torch_runtime_copy.so"
    shutil.copy(runtime_library_path(), copy)
    proc = _isolated(f"""
        import torch
        import tvm.contrib.torch
        torch.ops.load_library({str(copy)!r})
        print(torch.classes.tvm_class.TvmGraphModule(1, 1, "cpu").device())
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "cpu"
    assert f"the copy at '{copy}' is left uninitialised" in proc.stderr
    # From Python: a copy loaded first (by a C++ host, say) serves the package too. The copy's
    # $ORIGIN-relative rpath does not reach libtvm_ffi / libtvm_runtime / libdnnl from tmp_path
    # (a host links them): importing tvm loads the first two, and oneDNN is loaded here.
    proc = _isolated(f"""
        import ctypes
        import torch
        import tvm
        for path in {_onednn_libraries()!r}:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        torch.ops.load_library({str(copy)!r})
        import tvm.contrib.torch as t
        print(t.load_runtime_library())
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(copy)
    assert "the runtime library is already loaded from" in proc.stderr


def _foreign_cpu_target():
    """An LLVM target for a CPU with a feature this one lacks (None if this CPU has them all)."""
    missing = tvm.get_global_func("tvm_torch.missing_cpu_features")
    for mcpu in ("sapphirerapids", "graniterapids", "znver4", "icelake-server",
                 "skylake-avx512", "cannonlake", "znver3", "znver2", "haswell", "bdver4"):
        try:
            target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
            features = export.target_cpu_features(target)
        except Exception:  # pylint: disable=broad-except
            continue
        lacking = [str(f) for f in missing(features)]
        if lacking:
            return target, lacking
    return None, []


def test_default_target_uses_only_features_this_cpu_has():
    # LLVM gives a CPU model all of its features; a virtual machine can hide some (AMX on a
    # virtual Emerald Rapids). The default target must leave those out, or the runtime would
    # refuse every program compiled here.
    target = tvm.contrib.torch.build.host_cpu_target()
    features = export.target_cpu_features(target)
    assert features
    missing = tvm.get_global_func("tvm_torch.missing_cpu_features")
    assert list(missing(features)) == []
    full = tvm.target.Target({"kind": "llvm", "mcpu": str(target.attrs["mcpu"])})
    hidden = [str(f) for f in missing(export.target_cpu_features(full))]
    assert sorted(f"-{f}" for f in hidden) == sorted(target.attrs.get("mattr", []))


def test_cpu_features_are_recorded_and_checked_before_loading(tmp_path):
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    features = export.target_cpu_features(target)
    assert {"avx2", "fma", "bmi2"} <= set(features)
    manifest = export.make_manifest([{"name": "x", "shape": [1], "dtype": "float32"}], 1, [],
                                    [], target)
    assert manifest["cpu_features"] == features

    foreign, lacking = _foreign_cpu_target()
    if foreign is None:
        pytest.skip("this CPU has every feature of the CPUs tried")
    program = AffineProgram(str(tmp_path / "export"), "cpu")
    with open(program.files.graph_path, encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["cpu_features"] == export.target_cpu_features(
        tvm.contrib.torch.build.host_cpu_target())
    # Built for the foreign CPU (compiling works anywhere), loaded here: refused, not SIGILL.
    files = AffineProgram(str(tmp_path / "foreign"), "cpu", target=foreign).files
    proc = _isolated(f"""
        from tvm.contrib.torch import GraphModule
        try:
            GraphModule(1, 2).init([[4, 8]], {files.lib_path!r}, {files.graph_path!r},
                                   {files.params_path!r})
        except RuntimeError as err:
            print(str(err).splitlines()[0])
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled for a CPU with features this CPU lacks (" in proc.stdout
    for name in lacking:
        assert name in proc.stdout


# ---- the trust policy ----

_CONSTRUCTOR_LIB = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void ran(void) {
  const char* path = getenv("TVM_TORCH_TEST_MARKER");
  if (path) { FILE* f = fopen(path, "w"); if (f) { fputs("ran", f); fclose(f); } }
}
"""


@pytest.fixture
def constructor_library(tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C compiler")
    source = tmp_path / "evil.c"
    source.write_text(_CONSTRUCTOR_LIB)
    library = tmp_path / "evil.so"
    subprocess.run([compiler, "-x", "c", "-shared", "-fPIC", str(source), "-o", str(library)],
                   check=True)
    return library.read_bytes()


def test_an_untrusted_library_is_refused_before_any_of_its_code_runs(
        cpu_program, constructor_library, tmp_path):
    _, header, blobs = _state(cpu_program)
    evil = torch.frombuffer(bytearray(constructor_library), dtype=torch.uint8)
    state_path = tmp_path / "state.pt"
    torch.save(seal(header, [evil, blobs[1]]), str(state_path))
    marker = tmp_path / "marker"
    genuine = header["programs"][0]["lib_sha256"]
    listing = tmp_path / "trusted.txt"  # sha256sum's format, with a comment
    listing.write_text(f"# the libraries we built\n{genuine}  prog.so\n")
    policies = [genuine, str(listing), str(tmp_path / "missing.txt"), ""]
    proc = _isolated(f"""
        import os, torch, tvm.contrib.torch
        state = torch.load({str(state_path)!r}, weights_only=False)
        for policy in {policies!r}:
            os.environ["TVM_TORCH_TRUSTED_LIBRARIES"] = policy
            try:
                torch.classes.tvm_class.TvmGraphModule(1, 2, "cpu").load_state(state)
            except RuntimeError as err:
                print(str(err).splitlines()[0])
            print("constructor ran:", os.path.exists({str(marker)!r}))
    """, tmp_path, env={"TVM_TORCH_TEST_MARKER": str(marker)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    refusal = ("refusing to load a compiled library that is not trusted: its SHA-256 is "
               f"{_sha(constructor_library)}")
    assert refusal in lines[0] and lines[1] == "constructor ran: False"
    assert refusal in lines[2] and lines[3] == "constructor ran: False"
    assert "neither a list of SHA-256 digests nor a readable file" in lines[4]
    assert lines[5] == "constructor ran: False"
    # Without a policy the constructor runs at load: what the docs warn about.
    assert lines[-1] == "constructor ran: True"


def test_trusted_libraries_load_and_the_api_sets_the_policy(cpu_program, monkeypatch):
    digest = _sha(open(cpu_program.files.lib_path, "rb").read())
    x = torch.randn(4, 8)
    try:
        trust.set_trusted_libraries([digest.upper()])
        assert trust.trusted_libraries() == [digest]
        assert_outputs_close(_graph(cpu_program)([x]), cpu_program.reference(x))
        trust.set_trusted_libraries([])
        with pytest.raises(RuntimeError, match=rf"not trusted: its SHA-256 is {digest}"):
            _graph(cpu_program)
        with pytest.raises(RuntimeError, match=r"'abc' is not a SHA-256 digest"):
            trust.set_trusted_libraries(["abc"])
        trust.set_trusted_libraries(None)  # back to the environment
        monkeypatch.setenv("TVM_TORCH_TRUSTED_LIBRARIES", "0" * 64 + "," + digest)
        assert trust.trusted_libraries() == ["0" * 64, digest]
        assert_outputs_close(_graph(cpu_program)([x]), cpu_program.reference(x))
        monkeypatch.delenv("TVM_TORCH_TRUSTED_LIBRARIES")
        assert trust.trusted_libraries() is None
    finally:
        trust.set_trusted_libraries(None)


# ---- devices ----

@pytest.mark.parametrize("device", ["cuda:200", "cuda:128", "cuda:-1", "cuda:1x", "CUDA", ""])
def test_bad_device_strings_are_refused(device):
    with pytest.raises(RuntimeError, match=rf"invalid device '{device}'"):
        torch.classes.tvm_class.TvmGraphModule(1, 1, device)


# ---- saving and replacing model files ----

def _scripted(value: float) -> torch.jit.ScriptModule:
    class Add(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.full((256, 1024), value))

        def forward(self, x):
            return x + self.weight

    return torch.jit.script(Add())


def test_save_module_writes_through_an_exclusive_temp_file(tmp_path):
    target = tmp_path / "m.pt"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for name in (".m.pt.partial", ".m.pt.tmp", "m.pt.tmp"):
        os.symlink(victim, tmp_path / name)
    export.save_module(_scripted(1.0), str(target))
    assert victim.read_text() == "precious"
    assert torch.jit.load(str(target))(torch.zeros(1))[0, 0] == 1.0
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp") and n.startswith(".m.pt.")
                and not os.path.islink(tmp_path / n)]
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        export.save_module(_scripted(1.0), str(tmp_path / "no" / "m.pt"))


@pytest.mark.parametrize("fault", ["disk_full", "kill"])
def test_a_failed_save_leaves_the_old_file_intact(tmp_path, fault):
    target = tmp_path / "m.pt"
    export.save_module(_scripted(1.0), str(target))
    old = target.read_bytes()
    if fault == "disk_full":
        # A file-size limit makes writes fail as a full disk would (EFBIG instead of ENOSPC).
        proc = _isolated(f"""
            import resource, signal
            from test_security import _scripted
            from tvm.contrib.torch import export
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
            try:
                export.save_module(_scripted(2.0), {str(target)!r})
            except OSError as err:
                print("OSError", err.errno)
        """, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.startswith("OSError"), proc.stdout
    else:
        script = tmp_path / "saver.py"
        script.write_text(textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {_HERE!r})
            from test_security import _scripted
            from tvm.contrib.torch import export
            model = _scripted(2.0)
            print("saving", flush=True)
            while True:
                export.save_module(model, {str(target)!r})
        """))
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "saving"
        import time  # pylint: disable=import-outside-toplevel
        time.sleep(0.3)
        proc.kill()
        proc.wait()
    # The file is the old one or (killed after a rename) a complete new one.
    out = torch.jit.load(str(target))(torch.zeros(1))[0, 0].item()
    assert out in (1.0, 2.0)
    if fault == "disk_full":
        assert target.read_bytes() == old
        assert [n for n in os.listdir(tmp_path) if n.startswith(".m.pt.")] == []


def test_a_model_file_replaced_while_loading_loads_old_or_new(tmp_path):
    target = tmp_path / "m.pt"
    export.save_module(_scripted(1.0), str(target))
    writer = tmp_path / "writer.py"
    writer.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {_HERE!r})
        from test_security import _scripted
        from tvm.contrib.torch import export
        models = [_scripted(1.0), _scripted(2.0)]
        for i in range(16):
            export.save_module(models[i % 2], {str(target)!r})
    """))
    proc = subprocess.Popen([sys.executable, str(writer)])
    seen = set()
    try:
        while proc.poll() is None:
            seen.add(torch.jit.load(str(target))(torch.zeros(1))[0, 0].item())
    finally:
        proc.wait()
    assert proc.returncode == 0
    assert seen <= {1.0, 2.0} and seen


def test_a_state_refused_half_way_leaves_the_module_as_it_was(cpu_program, tmp_path):
    """A state's second program is untrusted: its first, acceptable alone, is not added either."""
    b8 = AffineProgram(str(tmp_path / "b8"), "cpu", batch=8)
    b2 = AffineProgram(str(tmp_path / "b2"), "cpu", batch=2)
    source = GraphModule(num_inputs=1, num_outputs=2)
    source.init([b8.shape], *b8.files.as_tuple())
    source.init([b2.shape], *b2.files.as_tuple())
    state, _ = source.engine.__getstate__()
    digests = [p["lib_sha256"] for p in json.loads(state[1])["programs"]]
    module = GraphModule(num_inputs=1, num_outputs=2)
    module.init([cpu_program.shape], *cpu_program.files.as_tuple())
    try:
        trust.set_trusted_libraries(trust.library_digests(module) + digests[:1])
        with pytest.raises(RuntimeError, match=rf"not trusted: its SHA-256 is {digests[1]}"):
            module.engine.load_state(state)
        assert module.signatures() == ["(float32[4, 8])"]
    finally:
        trust.set_trusted_libraries(None)
    x = torch.randn(4, 8)
    assert_outputs_close(module([x]), cpu_program.reference(x))
