"""Process settings: third-party output (issue 19), threads and the allocator (issue 17).

:data:`QUIET_ENV` turns off the progress bars and chatter of the libraries the jobs use, so that their
output is the jobs' own progress lines (:mod:`metaprep.progress`); :func:`quiet_third_party` applies it to
this process (``jobs._cli`` does at import, before any library is loaded), and
:func:`metaprep.train.launch.init_ray` hands it to every Ray worker.

The meta-step allocates and frees the same large tensors every step (activations, gradient
buckets, 113 MB embedding gradients for SmolLM2). glibc serves blocks above its mmap threshold
with fresh ``mmap`` pages and returns them on ``free``, so every step pays page faults and zeroing
for hundreds of MB: profiled on SmolLM2-135M (4 tasks x 8 examples x 64 tokens, fp32) this was a
third of the step. :func:`keep_freed_memory` keeps freed memory in the process for reuse.
``METAPREP_KEEP_FREED_MEMORY=0`` opts out.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

# Each library reads its switch when it is imported; a variable the user has set is kept.
QUIET_ENV = {
    # huggingface_hub's download bars, and transformers' bars ("Loading weights", "Writing model shards"),
    # which follow the hub's switch
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    # transformers' warnings and load reports; errors still show
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    # every other tqdm bar (tqdm reads TQDM_* as defaults of its arguments), e.g. GGUF dequantisation
    "TQDM_DISABLE": "1",
    # MLflow's artifact upload/download bars and its "View run ... at: URL" lines
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    # MLflow's telemetry thread edits os.environ while request threads read it (a KeyError
    # '_MLFLOW_TELEMETRY_SESSION_ID' failed a trial's log_batch); there is nothing to send offline
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # the tokenizers' "process just got forked" warning (data loading forks after tokenising)
    "TOKENIZERS_PARALLELISM": "false",
}


def quiet_env() -> dict[str, str]:
    """:data:`QUIET_ENV` with this process's own values where set: what Ray workers get."""
    return {key: os.environ.get(key, value) for key, value in QUIET_ENV.items()}


def quiet_third_party() -> None:
    """Set :data:`QUIET_ENV` in this process (keeping the user's values); before the libraries are imported."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


ENV = "METAPREP_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def _glibc():
    """glibc, or None (not Linux, or another C library such as musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never trim it (glibc ``mallopt``); False where not applied."""
    libc = _glibc()
    if os.environ.get(ENV) == "0" or libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory() -> None:
    """Return the heap's free pages to the OS (glibc ``malloc_trim``): for a long-lived process between
    phases, e.g. the throughput suite after one model's measurements and before its memory probes."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def configure_process(threads: int) -> None:
    """Intra-op threads for this process and the allocator setting above."""
    import torch  # here, so that jobs._cli can import this module before any library

    torch.set_num_threads(max(1, int(threads)))
    keep_freed_memory()


BF16_GEMM_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bf16 matmul instructions


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))


def native_bf16_matmul() -> bool | None:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16); ``None`` when unknown.

    Without those instructions torch's bf16 GEMMs take a reference path: measured on an AVX2-only EPYC
    (torch 2.13, 2 threads), ``torch.mm`` ran at 17.5 GFLOP/s in bf16 against 159 in fp32, and a SmolLM2
    meta-step under bf16 autocast took minutes instead of seconds.
    """
    flags = cpu_flags()
    return any(f in flags for f in BF16_GEMM_FLAGS) if flags else None


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's single-machine mode: node address = 127.0.0.1


def use_loopback_ray(address: str | None) -> bool:
    """Put this process in Ray's single-machine mode when ``address`` is a Ray head on the loopback.

    ``make up`` starts the head in that mode so its servers listen on 127.0.0.1 only; Ray otherwise
    turns 127.0.0.1 into the machine's address and a client would look for the head there. ``None`` and
    ``auto`` mean the cluster this machine last started (``/tmp/ray/ray_current_cluster``). A remote head
    leaves the process as it is. Call before ``ray.init``.
    """
    host = (address or "auto").split("://")[-1].rsplit(":", 1)[0]
    if host == "auto":
        try:
            host = Path("/tmp/ray/ray_current_cluster").read_text().strip().rsplit(":", 1)[0]
        except OSError:
            return False
    if host not in ("127.0.0.1", "localhost"):
        return False
    os.environ[LOOPBACK_ENV] = "0"
    if "ray" in sys.modules:  # already imported: the constant was read at import
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    return True


AUTH_MODE_ENV, AUTH_TOKEN_PATH_ENV = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"
STACK_TOKEN = "ray_auth_token"  # where cluster/stack.sh keeps the local stack's Ray token, in the state folder


def use_stack_token(state: Path) -> bool:
    """Authenticate to a Ray cluster on this machine with the state folder's token (``<state>/ray_auth_token``,
    the one ``make up`` starts the stack with; made here, 256 random bits readable by this user only, when a
    job starts its own local Ray), unless the environment already says how (``RAY_AUTH_MODE``,
    ``RAY_AUTH_TOKEN[_PATH]``).

    Ray >= 2.52 runs clusters with token authentication and otherwise keeps one token per user in
    ``~/.ray``, which then also switches on for every later ``ray start``; with the token in the state
    folder a job started by hand after ``make up`` connects without sourcing ``.state/stack.env``, and a
    local Ray of its own starts without Ray's warning. Call before ``ray.init``, for a cluster on this
    machine only.
    """
    if any(os.environ.get(k) for k in (AUTH_MODE_ENV, AUTH_TOKEN_PATH_ENV, "RAY_AUTH_TOKEN")):
        return False
    token = Path(state) / STACK_TOKEN
    if not token.is_file():
        import secrets

        token.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    os.environ[AUTH_MODE_ENV], os.environ[AUTH_TOKEN_PATH_ENV] = "token", str(token)
    if "ray._raylet" in sys.modules:  # Ray caches its config at import; re-read it, as Ray itself does
        from ray._raylet import Config

        Config.initialize("")
    return True
