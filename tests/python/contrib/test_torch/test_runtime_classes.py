"""The torch.classes.tvm_class runtime classes and their nn.Module wrappers."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import zipfile

import pytest
import torch

import tvm.contrib.torch as tvm_torch
from tvm.contrib.torch import GraphModule, VMModule, runtime_library_path
from conftest import AffineProgram, assert_outputs_close, run_fresh_python


def _graph_module(program, device):
    module = GraphModule(num_inputs=1, num_outputs=2, device=device)
    module.init([program.shape], *program.files.as_tuple())
    return module


def test_graph_module_matches_torch(affine_program, device):
    module = _graph_module(affine_program, device)
    x = torch.randn(4, 8, device=device)
    outputs = module([x])
    assert [o.device.type for o in outputs] == [device, device]
    assert_outputs_close(outputs, affine_program.reference(x))


def test_vm_module_runs_every_batch_in_range(tmp_path, device):
    program = AffineProgram(str(tmp_path), device, dynamic=True)
    module = VMModule(num_inputs=1, num_outputs=2, device=device)
    module.init([program.shape], *program.files.as_tuple())
    for batch in (1, 3, 8, 17):
        x = torch.randn(batch, 8, device=device)
        assert_outputs_close(module([x]), program.reference(x))
    with pytest.raises(RuntimeError, match=r"size 65 at dim 0, expected batch in \[1, 64\]"):
        module([torch.randn(65, 8, device=device)])


def test_graph_module_selects_program_by_shape(tmp_path, device):
    small = AffineProgram(str(tmp_path), device, batch=2, name="b2")
    large = AffineProgram(str(tmp_path), device, batch=6, name="b6")
    module = _graph_module(small, device)
    module.init([large.shape], *large.files.as_tuple())
    assert module.signatures() == ["(float32[2, 8])", "(float32[6, 8])"]
    for batch, program in ((2, small), (6, large)):
        x = torch.randn(batch, 8, device=device)
        assert_outputs_close(module([x]), program.reference(x))


def test_scripted_save_load_in_fresh_process_without_export_dir(tmp_path, device):
    program = AffineProgram(str(tmp_path / "export"), device)
    module = torch.jit.script(_graph_module(program, device))
    x = torch.randn(4, 8)
    saved = str(tmp_path / "model.pt")
    module.save(saved)
    torch.save({"x": x, "expected": program.reference(x)}, str(tmp_path / "io.pt"))
    shutil.rmtree(tmp_path / "export")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run_fresh_python(f"""
        import torch, tvm.contrib.torch
        model = torch.jit.load({saved!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        outputs = model([io["x"].to({device!r})])
        for a, e in zip(outputs, io["expected"]):
            torch.testing.assert_close(a.cpu(), e)
        print("OK", len(outputs))
    """, cwd=str(elsewhere))
    assert "OK 2" in out


def test_module_inside_scripted_model(affine_program, device):
    class Predictor(torch.nn.Module):
        def __init__(self, tvm_module):
            super().__init__()
            self.tvm_module = tvm_module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.tvm_module([x * 2.0])
            return torch.softmax(y[1], dim=-1)

    scripted = torch.jit.script(Predictor(_graph_module(affine_program, device)))
    x = torch.randn(4, 8, device=device)
    expected = torch.softmax(affine_program.reference(x * 2.0)[1], dim=-1)
    torch.testing.assert_close(scripted(x).cpu(), expected)


def test_inputs_not_contiguous_or_misaligned_are_correct(cpu_program):
    module = _graph_module(cpu_program, "cpu")
    base = torch.randn(8, 4)
    transposed = base.t()  # non-contiguous
    assert not transposed.is_contiguous()
    assert_outputs_close(module([transposed]), cpu_program.reference(transposed))
    flat = torch.randn(33 + 32)
    misaligned = flat[1:33].view(4, 8)  # data pointer 4 bytes past an aligned address
    assert misaligned.data_ptr() % 64 != 0
    assert_outputs_close(module([misaligned]), cpu_program.reference(misaligned))


def test_outputs_are_not_overwritten_by_later_calls(cpu_program):
    module = _graph_module(cpu_program, "cpu")
    x1, x2 = torch.randn(4, 8), torch.randn(4, 8)
    first = module([x1])
    kept = [t.clone() for t in first]
    module([x2])
    assert_outputs_close(first, kept, rtol=0, atol=0)


def test_inputs_are_passed_without_copy(cpu_program):
    """The program reads the caller's buffer: an in-place change between calls is seen."""
    module = _graph_module(cpu_program, "cpu")
    x = torch.zeros(4, 8)
    module([x])
    x.fill_(1.0)
    assert_outputs_close(module([x]), cpu_program.reference(torch.ones(4, 8)))


def test_concurrent_calls_from_threads_are_correct(tmp_path):
    small = AffineProgram(str(tmp_path), "cpu", batch=2, name="b2")
    large = AffineProgram(str(tmp_path), "cpu", batch=6, name="b6")
    wrapper = _graph_module(small, "cpu")
    wrapper.init([large.shape], *large.files.as_tuple())
    scripted = torch.jit.script(wrapper)
    failures = []

    def worker(seed):
        gen = torch.Generator().manual_seed(seed)
        for i in range(100):
            batch = 2 if (i + seed) % 2 else 6
            x = torch.randn(batch, 8, generator=gen)
            try:
                assert_outputs_close(scripted([x]), small.reference(x))
            except Exception as err:  # pylint: disable=broad-except
                failures.append(err)
                return

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]


@pytest.mark.parametrize("torch_threads", [1, 2])
def test_tvm_kernels_take_the_threads_torch_allows(tmp_path, torch_threads):
    """A call gives TVM's kernels on the calling thread torch.get_num_threads() threads, at most
    TVM's own default (here 2, from OMP_NUM_THREADS), instead of that default whatever torch
    is told."""
    if torch_threads > (os.cpu_count() or 1):
        pytest.skip(f"TVM's pool takes at most one thread per CPU; this machine has "
                    f"{os.cpu_count()}")
    program = AffineProgram(str(tmp_path / "export"), "cpu")
    out = run_fresh_python(f"""
        import os
        os.environ.pop("TVM_NUM_THREADS", None)
        os.environ["OMP_NUM_THREADS"] = "2"
        import torch
        import tvm
        from tvm.contrib.torch import GraphModule
        torch.set_num_threads({torch_threads})
        module = GraphModule(num_inputs=1, num_outputs=2, device="cpu")
        module.init([[4, 8]], *{program.files.as_tuple()!r})
        module([torch.randn(4, 8)])
        # TVM's pool for this thread, made now, takes the limit the call set.
        print(tvm.get_global_func("runtime.NumThreads")())
    """, str(tmp_path))
    assert int(out.split()[-1]) == torch_threads


@pytest.mark.parametrize("inputs, message", [
    (lambda: [], r"expected 1 input tensor\(s\), got 0"),
    (lambda: [torch.randn(4, 8), torch.randn(4, 8)], r"expected 1 input tensor\(s\), got 2"),
    (lambda: [torch.randn(5, 8)], r"no compiled program for inputs \(float32\[5, 8\]\); "
                                  r"compiled signatures: \(float32\[4, 8\]\)"),
    (lambda: [torch.randn(4, 8, 1)], r"no compiled program for inputs \(float32\[4, 8, 1\]\)"),
    (lambda: [torch.randn(4, 8).double()], r"no compiled program for inputs \(float64\[4, 8\]\)"),
    (lambda: [torch.empty(4, 8, device="meta")], r"input 0 is on meta but the module is on cpu"),
])
def test_bad_inputs_raise_clear_errors(cpu_program, inputs, message):
    module = _graph_module(cpu_program, "cpu")
    with pytest.raises(RuntimeError, match=message):
        module(inputs())
    x = torch.randn(4, 8)  # the module still works afterwards
    assert_outputs_close(module([x]), cpu_program.reference(x))


def test_vm_module_rejects_wrong_rank_and_dtype(tmp_path):
    program = AffineProgram(str(tmp_path), "cpu", dynamic=True)
    module = VMModule(1, 2)
    module.init([program.shape], *program.files.as_tuple())
    with pytest.raises(RuntimeError, match=r"input 0 \('x'\) has rank 1, expected 2"):
        module([torch.randn(8)])
    with pytest.raises(RuntimeError, match=r"input 0 \('x'\) has dtype int64, expected float32"):
        module([torch.ones(3, 8, dtype=torch.int64)])


def test_load_errors_name_the_problem(cpu_program, tmp_path):
    files = cpu_program.files
    with pytest.raises(RuntimeError, match=r"cannot open the compiled library file '.*nope.so'"):
        GraphModule(1, 2).init([[4, 8]], str(tmp_path / "nope.so"), files.graph_path,
                               files.params_path)
    with pytest.raises(RuntimeError, match=r"input_shapes\[0\] = \[4, 9\] does not match"):
        GraphModule(1, 2).init([[4, 9]], *files.as_tuple())
    with pytest.raises(RuntimeError, match=r"created with num_outputs=3 but the compiled "
                                           r"program returns 2"):
        GraphModule(1, 3).init([[4, 8]], *files.as_tuple())
    with pytest.raises(RuntimeError, match=r"invalid device 'tpu'"):
        torch.classes.tvm_class.TvmGraphModule(1, 2, "tpu")


def test_state_round_trips_through_load_state(cpu_program):
    state, _ = _graph_module(cpu_program, "cpu").engine.__getstate__()
    fresh = torch.classes.tvm_class.TvmGraphModule(1, 2, "cpu")
    fresh.load_state(state)
    x = torch.randn(4, 8)
    assert_outputs_close(fresh.forward([x]), cpu_program.reference(x))


def test_state_of_unknown_version_is_rejected(cpu_program):
    (version, header, blobs), _ = _graph_module(cpu_program, "cpu").engine.__getstate__()
    assert version == 2
    fresh = torch.classes.tvm_class.TvmGraphModule(1, 2, "cpu")
    with pytest.raises(RuntimeError, match=r"state format version 3, but this library reads "
                                           r"versions 1 to 2"):
        fresh.load_state((3, header, blobs))
    with pytest.raises(RuntimeError, match=r"state format version 0, but this library reads "
                                           r"versions 1 to 2"):
        fresh.load_state((0, header, blobs))


def test_corrupted_state_is_rejected(cpu_program):
    (version, header, blobs), _ = _graph_module(cpu_program, "cpu").engine.__getstate__()
    flipped = blobs[0].clone()
    flipped[len(flipped) // 2] ^= 0xFF
    fresh = torch.classes.tvm_class.TvmGraphModule(1, 2, "cpu")
    with pytest.raises(RuntimeError, match=r"corrupted or incomplete: program 0: the compiled "
                                           r"library does not match its recorded size/checksum"):
        fresh.load_state((version, header, [flipped, blobs[1]]))
    with pytest.raises(RuntimeError, match=r"expected 2 blobs, found 1"):
        fresh.load_state((version, header, [blobs[0]]))
    with pytest.raises(RuntimeError, match=r"the header is not valid JSON"):
        fresh.load_state((version, header[:-10], blobs))
    assert fresh.signatures() == []  # nothing was loaded half-way


def test_saved_file_with_flipped_bytes_fails_to_load(cpu_program, tmp_path):
    """Flip a byte inside the compiled library stored in a saved model: loading must fail."""
    path = str(tmp_path / "m.pt")
    torch.jit.script(_graph_module(cpu_program, "cpu")).save(path)
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info.filename)) for info in archive.infolist()]
    largest = max(entries, key=lambda e: len(e[1]))[0].filename
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for info, data in entries:
            if info.filename == largest:
                data = bytearray(data)
                data[len(data) // 2] ^= 0xFF
                data = bytes(data)
            archive.writestr(info, data)
    with pytest.raises(RuntimeError, match=r"corrupted or incomplete"):
        torch.jit.load(path)


def test_truncated_saved_file_fails_to_load(cpu_program, tmp_path):
    path = str(tmp_path / "m.pt")
    torch.jit.script(_graph_module(cpu_program, "cpu")).save(path)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(RuntimeError):
        torch.jit.load(path)


def test_to_moves_the_engine(cpu_program):
    module = _graph_module(cpu_program, "cpu")
    assert module.engine.device() == "cpu"
    module.to("cpu")
    module.cpu()
    assert module.engine.device() == "cpu"
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"compiled for cpu and cannot run on cuda:0"):
            module.engine.to("cuda")  # CPU code must not be loaded for a GPU


def test_runtime_library_links_no_python(tmp_path):
    path = runtime_library_path()
    assert os.path.isabs(path) and os.path.isfile(path)
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    ldd = subprocess.run(["ldd", path], capture_output=True, text=True, env=env, check=True)
    assert "not found" not in ldd.stdout, ldd.stdout
    assert "libtorch_python" not in ldd.stdout
    assert "libpython" not in ldd.stdout


def test_load_from_in_memory_bytes(cpu_program):
    files = cpu_program.files
    with open(files.lib_path, "rb") as lib, open(files.graph_path, encoding="utf-8") as graph, \
            open(files.params_path, "rb") as params:
        module = GraphModule(1, 2)
        module.load_bytes(lib.read(), graph.read(), params.read())
    x = torch.randn(4, 8)
    assert_outputs_close(module([x]), cpu_program.reference(x))
    with pytest.raises(RuntimeError, match=r"the graph manifest is not valid JSON"):
        GraphModule(1, 2).load_bytes(b"\x7fELF", "{not json", b"")


def test_bucket_padding_is_opt_in_and_reports_the_bucket(tmp_path):
    small = AffineProgram(str(tmp_path), "cpu", batch=2, name="b2")
    large = AffineProgram(str(tmp_path), "cpu", batch=6, name="b6")
    module = _graph_module(small, "cpu")
    module.init([large.shape], *large.files.as_tuple())
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"no compiled program for inputs \(float32\[4, 8\]\)"):
        module([x])
    module.engine.set_bucket_padding(True)
    outputs = module([x])
    assert [tuple(o.shape) for o in outputs] == [(4, 16), (4, 16)]
    assert_outputs_close(outputs, small.reference(x))
    assert module.last_signature() == "(float32[6, 8])"
    module([torch.randn(2, 8)])
    assert module.last_signature() == "(float32[2, 8])"
    assert module.call_counts() == {"(float32[2, 8])": 1, "(float32[6, 8])": 1}
    other = _graph_module(large, "cpu")
    assert other.last_signature() == ""
    other([torch.randn(6, 8)])
    assert module.last_signature() == "(float32[2, 8])"  # per module, not per process
    with pytest.raises(RuntimeError, match=r"bucket padding found no larger batch bucket"):
        module([torch.randn(7, 8)])
    path = str(tmp_path / "padded.pt")
    torch.jit.script(module).save(path)
    assert_outputs_close(torch.jit.load(path)([x]), small.reference(x))  # the flag is saved


def test_memory_stays_flat_over_10000_calls(cpu_program):
    import psutil

    module = _graph_module(cpu_program, "cpu")
    x = torch.randn(4, 8)
    process = psutil.Process()
    for _ in range(1000):
        module([x])
    before = process.memory_info().rss
    for _ in range(10000):
        module([x])
    grown = process.memory_info().rss - before
    assert grown < 8 * 1024 * 1024, f"resident memory grew by {grown / 2**20:.1f} MiB"


def test_saved_model_loads_in_four_processes_at_once(cpu_program, tmp_path):
    path = str(tmp_path / "m.pt")
    torch.jit.script(_graph_module(cpu_program, "cpu")).save(path)
    x = torch.randn(4, 8)
    torch.save({"x": x, "expected": cpu_program.reference(x)}, str(tmp_path / "io.pt"))
    script = tmp_path / "load.py"
    script.write_text(
        "import torch, tvm.contrib.torch\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"m = torch.jit.load({path!r})\n"
        "for _ in range(50):\n"
        "    for a, e in zip(m([io['x']]), io['expected']):\n"
        "        torch.testing.assert_close(a, e)\n"
        "print('OK')\n")
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "OK" in out, err[-2000:]


def test_model_loaded_then_forked_serves_in_the_child(tmp_path):
    """The preload-then-fork serving pattern (gunicorn --preload, multiprocessing's fork): a
    conv model loaded, never run, in the parent serves in a forked child. Loading must not
    start oneDNN's thread pool (weights are prepacked at the first call), or the child hangs
    in it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Flatten(),
                                torch.nn.Linear(16 * 16 * 16, 10)).eval()
    x = torch.rand(2, 3, 16, 16)
    module = tvm_torch.compile(model, {"input_infos": [("x", (2, 3, 16, 16))],
                                       "export_dir": str(tmp_path / "export")})
    torch.jit.script(module).save(str(tmp_path / "model.pt"))
    torch.save((x, model(x).detach()), str(tmp_path / "io.pt"))
    out = run_fresh_python("""
        import os, signal, torch, tvm.contrib.torch
        model = torch.jit.load("model.pt")      # loaded, never run, in the parent
        x, expected = torch.load("io.pt")
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)  # a hung child dies instead of outliving the test
            try:
                ok = torch.allclose(model([x])[0], expected, rtol=1e-4, atol=1e-4)
                os.write(writer, b"1" if ok else b"0")
            finally:
                os._exit(0)
        os.close(writer)
        print("child:", os.read(reader, 1).decode())
        os.waitpid(pid, 0)
        torch.testing.assert_close(model([x])[0], expected, rtol=1e-4, atol=1e-4)
        print("parent ok")
    """, cwd=str(tmp_path), timeout=120)
    assert "child: 1" in out and "parent ok" in out
