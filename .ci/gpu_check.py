"""The checks that need an NVIDIA GPU, as one bounded run of at most 8 minutes
on a bare machine with one and no network (`bash .ci/gpu-check OUT_DIR`):

1. Preflight (seconds): this Python holds what the checks need (torch with
   CUDA, Triton, pytest, the experiment side's click, tqdm and matplotlib);
   what the benchmark also times where it can (torchao, bitsandbytes) is
   installed from wheels in WHEELS (default: .whl in the repository root,
   fetched beforehand by `bash .ci/gpu-wheels` on a machine with a network)
   into OUT_DIR/site. Anything still missing is named with that step. Without
   a CUDA device it stops here, non-zero.
2. The CUDA tests (at most 200 s): the Triton kernels against the reference
   and the contract table's option sets on the GPU. A failure fails the check.
3. The benchmark (two parts of at most 120 s): Lamb16 on the Triton kernels
   (and compiled, at 10 M and on the GPT-style set), Adam fused and the
   low-bit AdamWs at 10 M, 100 M and 1 B elements and on the GPT-style set of
   147 tensors, with each step's GB/s and
   step-time memory; each result written to OUT_DIR/bench-*.json as it is
   measured, and a time never labelled with a path that did not run.

Everything goes to OUT_DIR: preflight.txt, tests.log, bench-*.log, bench-*.json.
Exit status: 0 all passed, 1 a test or the benchmark failed, 2 refused (no
CUDA device, or something required missing).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {"torch": "torch", "triton": "triton", "pytest": "pytest", "click": "click", "tqdm": "tqdm",
            "matplotlib": "matplotlib"}  # module: distribution
TIMED_PEERS = {"torchao": "torchao", "bitsandbytes": "bitsandbytes"}
FETCH = "bash .ci/gpu-wheels (on a machine with a network, then bring .whl along)"
TESTS_SECONDS = 200
BENCH_SECONDS = 120
BENCH_PARTS = (
    # The compiled path (the fallback) where its graphs compile in time: Inductor compiles for each new shape.
    ("10m,gpt150", "adam fused,lamb16,lamb16 1pass,lamb16 absmax,lamb16 absmax 1pass,lamb16 compiled,"
                   "lamb16 1pass compiled"),
    # Memory: each optimizer keeps its own weights (at 1 B, 4 GB each, and Adam's 8 GB of state).
    ("100m,1b", "adam fused,lamb16,lamb16 1pass,lamb16 absmax 1pass"),
)
PEERS_TIMED = ("ao-adamw8bit", "ao-adamwfp8", "bnb-adamw8bit")


def missing(modules) -> list[str]:
    return [name for name in modules if importlib.util.find_spec(name) is None]


def install_missing(modules: dict[str, str], wheels: Path, site: Path) -> tuple[list[str], str]:
    """Install each missing module's distribution from a wheel in `wheels`
    into `site` (no index: the machine has no network); returns what is still
    missing, and pip's words where it failed."""
    absent = missing(modules)
    found = [w for name in absent for w in sorted(wheels.glob(f"{modules[name].replace('-', '_')}-*.whl"))]
    if not found:
        return absent, ""
    site.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                             "--target", str(site), *map(str, found)], capture_output=True, text=True, timeout=120)
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    return missing(absent), result.stderr.strip()


def preflight(out: Path, wheels: Path) -> tuple[int, dict[str, str]]:
    """(exit status, environment for the later steps): 0 to go on, 2 refused."""
    lines: list[str] = [f"python {sys.version.split()[0]} at {sys.executable}"]
    site = out / "site"
    still, pip_said = install_missing({**REQUIRED, **TIMED_PEERS}, wheels, site)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    if pip_said:
        lines.append(f"pip, installing from {wheels}: {pip_said.splitlines()[-1]}")
    status = 0
    for name in still:
        if name in REQUIRED:
            lines.append(f"missing, required: {name}: put its wheel in {wheels} ({FETCH})")
            status = 2
        else:
            lines.append(f"missing: {name} (not timed; to time it: {FETCH})")
    if status == 0:
        import torch

        lines.append(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
        if not torch.cuda.is_available():
            lines.append("no CUDA device here (torch.cuda.is_available() is False): run this check on a machine "
                         "with an NVIDIA GPU")
            status = 2
        else:
            import triton

            lines.append(f"{torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}, "
                         f"triton {triton.__version__}")
    text = "\n".join(lines)
    print(text, flush=True)
    (out / "preflight.txt").write_text(text + "\n")
    return status, env


def bounded(command: list[str], log: Path, seconds: int, env: dict[str, str]) -> int:
    """Run `command` from the repository root, its output to `log` (then printed), stopped after `seconds`."""
    with log.open("w") as sink:
        try:
            status = subprocess.run(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                    timeout=seconds).returncode
        except subprocess.TimeoutExpired:
            sink.write(f"\nstopped after {seconds} s\n")
            status = 124
    print(log.read_text(), end="", flush=True)
    return status


def main(out: Path, wheels: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    status, env = preflight(out, wheels)
    if status:
        return status
    tests = bounded([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "tests/test_triton.py",
                     "tests/test_contract.py", "-k", "triton or cuda"], out / "tests.log", TESTS_SECONDS, env)
    peers = [name for name in PEERS_TIMED if not missing([TIMED_PEERS["torchao" if name.startswith("ao") else
                                                                      "bitsandbytes"]])]
    benches = []
    for part, (sizes, optimizers) in enumerate(BENCH_PARTS, 1):
        names = ",".join([optimizers, *peers])
        benches.append(bounded([sys.executable, "cli.py", "bench", "--device", "cuda", "--steps-only", "--sizes",
                                sizes, "--optimizers", names, "--steps", "10", "--warmup", "3", "--json",
                                str(out / f"bench-{part}.json")], out / f"bench-{part}.log", BENCH_SECONDS, env))
    print(f"tests: exit {tests}; bench: exit {benches}", flush=True)
    return 0 if tests == 0 and not any(benches) else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: bash .ci/gpu-check OUT_DIR")
    sys.exit(main(Path(sys.argv[1]), Path(os.environ.get("WHEELS", ROOT / ".whl"))))
