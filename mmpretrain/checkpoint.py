"""Save, resume and keep-last-k of run checkpoints, and loading a trained model back.

Layout of ``<output_dir>/checkpoints/``::

    step_<N>/                DeepSpeed engine state (ZeRO shards, optimizer, LR scheduler)
        meta.json            step, samples seen, resolved config, data position, wandb run id
        rng_rank<R>.pt       torch / CUDA / numpy / python RNG states of rank R
        objective_state.pt   what objective terms keep beyond the weights (self_distill's EMA teacher), by rank 0
    latest                   text file naming the newest complete tag

``latest`` is replaced with an atomic rename only after every rank's files are written and
fsync'd, so a kill during a save leaves it on the previous complete checkpoint. DeepSpeed's
shards are pickles: a run folder is trusted like code. The RNG files hold plain values and load with
weights_only=True.

Background saves (``checkpoint.async_save``, the default): DeepSpeed's checkpoint engine is
swapped for one that keeps what it is given; a thread per rank copies those tensors to host
memory while the next step's forward and backward run (ZeRO 0-2: the optimizer update waits for
the copy; ZeRO 3 copies inside the save, its forward swaps parameter storage), then writes the
files (temporary name, fsync, rename), fsyncs the folder and leaves ``done_rank<R>``. Rank 0's
thread waits for every rank's marker on the shared file system, then writes meta.json and moves
``latest``. No collective runs outside the main thread. One save is in flight at a time: the next
save, and the end of the run, wait for it. The host copy costs one checkpoint's size of host
memory, kept for the run: every save copies into the same buffers (no page faults). The stall
(checkpoint/stall_s) is the time the training was blocked: in the save, and in the update's wait.
(DeepSpeed's own DecoupledCheckpointEngine needs its aio/GDS writer ops, which CPU builds lack,
and writes ``latest`` itself at the next optimizer step; PyTorch's ``dcp.async_save`` writes its
own format. This is their staging-then-writer-thread design over DeepSpeed's files.)

The folder's layout and its readers (latest tag, step folders, meta.json) are in
mmpretrain.run_folder; this module adds what needs the engine.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import torch

from mmpretrain.checkpoint_config import CheckpointConfig  # noqa: F401  (it lived here)
from mmpretrain.convert import load_any, read_run
from mmpretrain.convert.common import check_state_dict
from mmpretrain.distributed import barrier
from mmpretrain.model import build_model
from mmpretrain.objectives import Objective
from mmpretrain.run_folder import (  # find_step_dir, latest_tag: callers (tests, train.py) import them from here
    LATEST,
    META,
    checkpoint_root,
    find_step_dir,  # noqa: F401
    is_run,
    latest_tag,
    read_meta,
    step_numbers,
    step_tag,
    write_atomic,
)

UNIVERSAL_CHECKPOINT_INFO = "universal_checkpoint_info"  # deepspeed.checkpoint.UNIVERSAL_CHECKPOINT_INFO
OBJECTIVE_STATE = "objective_state.pt"  # Objective.state_dict(): tensors only, loaded with weights_only=True
UNIVERSAL_POLL_S = 1.0  # how often the other ranks look for rank 0's converted checkpoint


def rng_state() -> dict:
    """This process's RNG states as tensors, ints, floats and tuples only: the file loads with weights_only=True
    (numpy's state is a tuple holding an ndarray, stored here as its parts)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = dict(name=name, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                       has_gauss=int(has_gauss), gauss=float(gauss))  # fmt: skip
    state = {
        "torch": torch.get_rng_state(),
        "numpy": numpy_state,
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss_next): plain Python values
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    if isinstance(npst, dict):
        keys = npst["keys"].numpy().astype(np.uint32)
        np.random.set_state((npst["name"], keys, npst["pos"], npst["has_gauss"], npst["gauss"]))
    else:  # written before the RNG state was stored as plain values: numpy's own tuple
        np.random.set_state(npst)
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_rng_state(path: str) -> dict:
    """A rng_rank<R>.pt, loaded with weights_only=True (no code runs). Files written before the states were stored as
    plain values hold numpy arrays: exactly numpy's array reconstruction is allowed for them, nothing else."""
    numpy_array = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(numpy_array):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exn:  # an UnpicklingError names the class it refused; a damaged file, what is wrong
        why = str(exn).strip().splitlines()[-1][:300] if str(exn).strip() else type(exn).__name__
        raise ValueError(f"{path}: not a readable RNG state ({why}); delete it to resume without it") from None


DONE = "done_rank{rank}"  # a rank's files in a step folder are complete and durable (background saves)


def _write_durable(obj, path: str) -> None:
    """torch.save to a temporary name, fsync, rename: the file is whole or absent."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # the renames into the folder are durable
    finally:
        os.close(fd)


def _host_copy(obj, staging: dict | None = None, name: str = ""):
    """A deep copy of a state dict whose tensors are copies in host memory (a snapshot the step may not change).
    Each storage is copied once and the tensors stay views of it, so the file is what torch.save would write.

    ``staging``: host buffers kept from the previous save, keyed by (file name, storage index); a storage of the
    same size is copied into its buffer instead of into fresh memory (no page faults: the stall is the copy alone).
    """
    memo: dict = {}
    storages: dict = {}

    def host_storage(st):
        key = (name, len(storages))
        buf = staging.get(key) if staging is not None else None
        if buf is None or buf.nbytes() != st.nbytes():
            # on the host; pinned for a device's storage (a direct DMA copy; not exercised on the CPU-only CI)
            pinned = st.device.type != "cpu"
            buf = torch.empty(st.nbytes(), dtype=torch.uint8, pin_memory=pinned).untyped_storage()
            if staging is not None:
                staging[key] = buf
        buf.copy_(st)
        return buf

    def visit(o):
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            key = (st.device, st.data_ptr())
            if key not in storages:
                storages[key] = host_storage(st)
            view = torch.empty(0, dtype=o.dtype).set_(storages[key], o.storage_offset(), o.size(), o.stride())
            memo[id(o)] = view
        elif isinstance(o, dict):
            for v in o.values():
                visit(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                visit(v)

    visit(obj)
    return copy.deepcopy(obj, memo)  # tensors come from the memo; containers and the rest are copied


class _Capture:
    """Stands in for DeepSpeed's checkpoint engine during a save; everything but ``save`` is the real engine's.
    ``save(state_dict, path)`` writes durably at once (``mode="write"``: synchronous saves), or keeps the state dict
    for the writer thread: as references that the thread copies to host memory before the next optimizer update
    (``"refs"``), or copied to host memory now (``"copy"``: ZeRO 3, whose forward swaps parameter storage)."""

    def __init__(self, inner, mode: str, staging: dict | None):
        self.inner, self.mode, self.staging, self.files = inner, mode, staging, []

    def save(self, state_dict, path: str) -> None:
        if self.mode == "write":
            _write_durable(state_dict, path)
        elif self.mode == "copy":
            self.files.append((path, _host_copy(state_dict, self.staging, os.path.basename(path))))
        else:
            self.files.append((path, state_dict))

    def staged(self) -> list:
        """(path, object) pairs whose tensors are in host memory (copied now where they were kept as references)."""
        if self.mode != "refs":
            return list(self.files)
        return [(path, _host_copy(sd, self.staging, os.path.basename(path))) for path, sd in self.files]

    def __getattr__(self, name):
        return getattr(self.inner, name)


class BackgroundSaver:
    """At most one checkpoint write in flight on this rank; ``wait()`` joins it and re-raises its error.

    The thread first copies the state to host memory (``staged`` is set then), then writes. The optimizer update
    after a save must wait for that copy (``wait_staged``, TrainStep's ``before_update``): until then the forward
    and backward of the next step run beside the copy. ``pop_stall()`` gives (step, seconds the training was
    blocked: in the save plus in ``wait_staged``) once the copy is done, for checkpoint/stall_s.
    """

    def __init__(self, timeout_s: float = 3600.0):
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.timeout_s = timeout_s  # how long rank 0 waits for the other ranks' markers
        self.staging: dict = {}  # host buffers reused by every save (one checkpoint's size of host memory)
        self.staged = threading.Event()
        self.staged.set()
        self.pending: list | None = None  # [step, seconds blocked] of the last save, until popped

    def start(self, stage, write) -> None:
        """Run ``write(stage())`` in the writer thread; ``staged`` is set once ``stage`` returned (or failed)."""
        self.wait()
        self.staged.clear()

        def run():
            try:
                try:
                    files = stage()
                finally:
                    self.staged.set()
                write(files)
            except BaseException as e:  # noqa: BLE001  (kept for the main thread)
                self.error = e

        # daemon: a run that ends without wait() (an error, a second Ctrl-C) abandons the write, as a kill would
        self.thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def wait_staged(self) -> None:
        """Block until the last save's state is in host memory (before anything changes it in place)."""
        t0 = time.perf_counter()
        while not self.staged.wait(0.2):  # in slices: a signal still interrupts the main thread
            pass
        if self.pending is not None:
            self.pending[1] += time.perf_counter() - t0

    def pop_stall(self) -> tuple[int, float] | None:
        if self.pending is None or not self.staged.is_set():
            return None
        step, seconds = self.pending
        self.pending = None
        return step, seconds

    def wait(self) -> None:
        while self.thread is not None and self.thread.is_alive():
            self.thread.join(0.2)  # in slices: a signal (the second Ctrl-C) still interrupts the main thread
        self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise RuntimeError(f"the background checkpoint write failed: {error}") from error


def save(engine, output_dir: str, step: int, meta: dict, rank: int, keep_last: int, before_commit=None,
         saver: BackgroundSaver | None = None, world_size: int = 1,
         objective_state: dict | None = None) -> tuple[str, float]:  # fmt: skip
    """Save on every rank (a collective); returns (tag, seconds the caller was blocked). ``meta`` must be the same
    on all ranks. With ``saver`` the files are written in the background (see the module docstring).

    Order: DeepSpeed's files and the RNG states of every rank, each fsync'd, then meta.json, then ``latest``. A step
    folder without meta.json is incomplete and is never resumed from. ``before_commit(step)`` runs after this rank's
    files are written, before its part is marked complete (fault injection in tests). ``objective_state``: the
    objective's kept state (Objective.state_dict(), a snapshot the next step does not change; the same on every
    rank), written by rank 0 when not empty.
    """
    t0 = time.perf_counter()
    if saver is not None:
        saver.wait()  # the previous save is committed before this one starts (and before pruning can race it)
    root = checkpoint_root(output_dir)
    tag = step_tag(step)
    tag_dir = os.path.join(root, tag)
    os.makedirs(tag_dir, exist_ok=True)
    done = os.path.join(tag_dir, DONE.format(rank=rank))
    for stale in (done, *([os.path.join(tag_dir, META)] if rank == 0 else [])):
        # left by a save that was killed: DeepSpeed writes over the folder, but a stale meta.json or marker must not
        # make it look complete
        if os.path.exists(stale):
            os.remove(stale)
    barrier()  # no stale marker is left when any rank's writer starts
    # ZeRO 0-2 leave the weights and optimizer state alone until the next update: the copy can run beside the next
    # forward and backward. ZeRO 3's forward swaps parameter storage, so it copies now.
    mode = "write" if saver is None else ("refs" if engine.zero_optimization_stage() < 3 else "copy")
    capture = _Capture(engine.checkpoint_engine, mode, saver.staging if saver is not None else None)
    engine.checkpoint_engine = capture
    try:
        # the (empty) universal-checkpoint marker lets ds_to_universal convert this save for another world size
        engine.save_checkpoint(root, tag=tag, save_latest=False, client_state={UNIVERSAL_CHECKPOINT_INFO: {}})
    finally:
        engine.checkpoint_engine = capture.inner
    rng = (os.path.join(tag_dir, f"rng_rank{rank}.pt"), rng_state())
    own = [rng]
    if objective_state and rank == 0:
        own.append((os.path.join(tag_dir, OBJECTIVE_STATE), {k: v.cpu() for k, v in objective_state.items()}))
    record = json.dumps({"step": step, **meta}, indent=1)

    def write_and_commit(files):
        for path, obj in files:
            _write_durable(obj, path)
        _fsync_dir(tag_dir)
        if before_commit is not None:
            before_commit(step)
        if saver is None:
            barrier()  # every rank's files are durable
        else:
            write_atomic(done, "written and fsync'd\n")
            if rank == 0:
                _wait_for_markers(tag_dir, world_size, saver.timeout_s)
        if rank == 0:
            write_atomic(os.path.join(tag_dir, META), record)
            write_atomic(os.path.join(root, LATEST), tag)
            _fsync_dir(root)
            _prune(output_dir, keep_last, keep=tag)

    if saver is None:
        write_and_commit(own)
        barrier()
        return tag, time.perf_counter() - t0
    saver.start(lambda: [*capture.staged(), *own], write_and_commit)
    stall = time.perf_counter() - t0
    saver.pending = [step, stall]
    return tag, stall


def _wait_for_markers(tag_dir: str, world_size: int, timeout_s: float) -> None:
    """Rank 0's writer: until every rank's part of this checkpoint is durable (their markers on the shared disk)."""
    deadline = time.monotonic() + timeout_s
    missing = list(range(world_size))
    while missing:
        missing = [r for r in missing if not os.path.isfile(os.path.join(tag_dir, DONE.format(rank=r)))]
        if missing and time.monotonic() > deadline:
            raise TimeoutError(f"{tag_dir}: ranks {missing} did not finish writing within {timeout_s:.0f} s")
        if missing:
            time.sleep(0.05)


def _prune(output_dir: str, keep_last: int, keep: str) -> None:
    root = checkpoint_root(output_dir)
    for s in step_numbers(output_dir)[:-keep_last]:
        if step_tag(s) != keep:
            shutil.rmtree(os.path.join(root, step_tag(s)), ignore_errors=True)
            shutil.rmtree(os.path.join(root, f"{step_tag(s)}_universal"), ignore_errors=True)


def prepare_resume(output_dir: str, *, world_size: int, zero_stage: int, rank: int) -> tuple[str | None, bool]:
    """(tag to load or None, whether it is a DeepSpeed universal checkpoint). Call before building the engine.

    A checkpoint written by another number of ranks loads directly under ZeRO stage 0 (whole optimizer
    state in one file). ZeRO 1-3 partition the optimizer state by rank: rank 0 converts the checkpoint
    once with DeepSpeed's ds_to_universal into ``step_N_universal`` (weights and optimizer state per
    parameter, independent of the world size), and the engine loads that with ``load_universal``.
    """
    tag = latest_tag(output_dir)
    if tag is None:
        return None, False
    meta = read_meta(os.path.join(checkpoint_root(output_dir), tag))
    if meta["world_size"] == world_size or zero_stage == 0:
        return tag, False
    root = checkpoint_root(output_dir)
    universal = f"{tag}_universal"
    done, failed = os.path.join(root, universal, "done"), os.path.join(root, f"{universal}.failed")
    convert = not os.path.isfile(done)
    if rank == 0 and convert:
        shutil.rmtree(os.path.join(root, universal), ignore_errors=True)  # an earlier, interrupted attempt
        if os.path.exists(failed):
            os.remove(failed)
    # collective, immediate (every rank gets here at the same point of its start): from here on a `failed` marker
    # is this launch's
    barrier()
    if convert:
        # The conversion takes as long as the model is large (minutes to hours), far beyond the process group's
        # timeout (engine.dist_timeout_s), so no rank waits for it inside a collective: rank 0 converts, the
        # others poll the shared checkpoint folder (which they load from next anyway) for its `done` or `failed`
        # marker, without any timeout. A rank 0 that dies outright ends the job through the launcher (torchrun
        # and srun stop the other ranks), as at any other point of the run.
        if rank == 0:
            try:
                convert_to_universal(os.path.join(root, tag), os.path.join(root, universal))
            except BaseException as exn:
                write_atomic(failed, f"{type(exn).__name__}: {exn}\n")
                raise
            shutil.copy(os.path.join(root, tag, META), os.path.join(root, universal, META))
            write_atomic(done, "ds_to_universal finished\n")
        else:
            wait_for_conversion(done, failed)
    barrier()  # immediate: every rank has seen the converted checkpoint
    return universal, True


def convert_to_universal(step_dir: str, out_dir: str) -> None:
    """DeepSpeed's ds_to_universal of one step folder into out_dir, in a child process; RuntimeError on failure."""
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", step_dir,
           "--output_folder", out_dir, "--num_extract_workers", "1", "--num_merge_workers", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {step_dir} to a universal checkpoint failed:\n{proc.stderr[-3000:]}")


def wait_for_conversion(done: str, failed: str, poll_s: float = UNIVERSAL_POLL_S) -> None:
    """Poll until rank 0 wrote ``done`` (return) or ``failed`` (raise, with rank 0's error); no time limit."""
    waited = 0.0
    while not os.path.isfile(done):
        if os.path.isfile(failed):
            with open(failed) as f:
                raise RuntimeError(f"rank 0 could not convert the checkpoint ({failed}): {f.read().strip()}")
        time.sleep(poll_s)
        waited += poll_s
        if waited % 600 < poll_s:
            print(f"waiting for rank 0 to convert the checkpoint ({waited / 60:.0f} min so far; {done})", flush=True)


def resume(engine, output_dir: str, rank: int, tag: str | None = None, objective=None) -> dict | None:
    """Load ``tag`` (default: ``latest``) into the engine and restore this rank's RNG and, where its terms keep
    state (an EMA teacher), ``objective``'s; returns its meta or None."""
    tag = tag or latest_tag(output_dir)
    if tag is None:
        return None
    root = checkpoint_root(output_dir)
    load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {os.path.join(root, tag)}")
    meta = read_meta(os.path.join(root, tag))
    rng_path = os.path.join(root, tag, f"rng_rank{rank}.pt")
    if os.path.isfile(rng_path):  # absent when resuming on a larger world size
        set_rng_state(load_rng_state(rng_path))
    if objective is not None and objective.state_dict():
        # a universal checkpoint (step_N_universal) is converted from step_N, which keeps this file
        path = os.path.join(root, tag.removesuffix("_universal"), OBJECTIVE_STATE)
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing: the run's objective ({', '.join(objective.names)}) keeps state "
                             "(an EMA teacher) that this checkpoint must hold")  # fmt: skip
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exn:  # a damaged file: say which
            raise ValueError(f"{path}: not a readable objective state ({type(exn).__name__}: {exn})") from None
        objective.load_state_dict(state)
    return meta


def load_state_dict(step_dir: str) -> dict[str, torch.Tensor]:
    """Whole fp32 model weights from a checkpoint of any ZeRO stage and world size, on CPU: a run's own read of its
    checkpoint (its pickles are trusted, like a resume's).

    Stage 0 keeps whole weights in its module file (zero_to_fp32 does not handle it); stages 1-3
    go through DeepSpeed's consolidation. The work, and its checks, live in mmpretrain.convert.
    """
    return read_run(step_dir, torch.float32, trust_pickles=True)[0]


def load_model_from_run(path: str, trust_pickles: bool = False):
    """(model in eval mode, config) from a run folder or a step folder; the weights load strictly."""
    return load_any(path, trust_pickles=trust_pickles)


def load_model(path: str, trust_pickles: bool = False):
    """(fp32 model in eval mode, Config) from any source mmpretrain.convert.load_any reads; a run folder's model also
    gets its objective heads (`model.heads`, e.g. the ITM head that re-ranks retrieval), built from the run's config by
    mmpretrain.objectives and loaded strictly with the rest. What `python -m mmpretrain.eval` loads. ``trust_pickles``:
    a run's DeepSpeed pickles may be unpickled (mmpretrain/convert/ours.py)."""
    if not is_run(path):
        return load_any(path)  # HF / OpenCLIP / consolidated folders hold the towers alone
    sd, cfg = read_run(path, trust_pickles=trust_pickles)  # towers checked there; heads.* passed through
    model = build_model(cfg.model)
    Objective(cfg).attach_heads(model)
    check_state_dict(sd, {k: v.shape for k, v in model.state_dict().items()}, path)  # the heads too
    model.load_state_dict(sd, strict=True)
    return model.eval(), cfg
