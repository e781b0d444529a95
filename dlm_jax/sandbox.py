"""Running generated Python code: a subprocess with a wall-clock limit, CPU / memory / file-size limits, an empty
temporary working directory, an isolated interpreter (`python -I`: no user site, no PYTHON* variables) and a minimal
environment; on timeout the whole process group is killed. Used by execution-scored evaluation tasks (code tests) and
by verifiable rewards.

This keeps a model's mistakes (infinite loops, memory blow-ups, stray files) away from the caller. It is not a
security boundary against hostile code (the child can still reach the network and read files): run untrusted models
inside a container or VM.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile


@dataclasses.dataclass(frozen=True)
class Result:
  status: str  # "passed" (exit 0), "failed" (non-zero exit), "timeout"
  returncode: int | None
  stdout: str
  stderr: str

  @property
  def passed(self) -> bool:
    return self.status == "passed"


# The child sets its own limits before it runs the code (no preexec_fn: Python code between fork and exec can deadlock
# in a multithreaded parent such as JAX).
_BOOTSTRAP = """import resource, sys
cpu, mem, fsize = {cpu}, {mem}, {fsize}
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
del resource, cpu, mem, fsize
sys.argv = ["main.py"]
__file__ = "main.py"
with open("main.py", encoding="utf-8") as _f:
  _code = compile(_f.read(), "main.py", "exec")
del _f
exec(_code)
"""


def run_python(code: str, *, timeout: float = 10.0, memory_mb: int = 1024, file_mb: int = 16, stdin: str = "",
               max_output: int = 1 << 16) -> Result:
  """Runs `code` as a script in a fresh interpreter under the limits above; stdout / stderr are cut to `max_output`
  characters."""
  with tempfile.TemporaryDirectory(prefix="dlm_sandbox_") as tmp:
    path = os.path.join(tmp, "main.py")
    with open(path, "w", encoding="utf-8") as f:
      f.write(code)
    env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    boot = _BOOTSTRAP.format(cpu=max(1, int(timeout) + 1), mem=memory_mb << 20, fsize=file_mb << 20)
    proc = subprocess.Popen([sys.executable, "-I", "-c", boot], cwd=tmp, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
      out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      out, err = proc.communicate()
      return Result("timeout", None, out[:max_output], err[:max_output])
  status = "passed" if proc.returncode == 0 else "failed"
  return Result(status, proc.returncode, out[:max_output], err[:max_output])


def passes_tests(program: str, tests: str, *, timeout: float = 10.0, memory_mb: int = 1024) -> bool:
  """True when `program` followed by `tests` (assert statements, a check() call, ...) exits 0 within the limits."""
  return run_python(program + "\n\n" + tests + "\n", timeout=timeout, memory_mb=memory_mb).passed
