"""Runs a script of bench/ in a child process on the CPU, for the tests that check it works."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess:
  """`python bench/<script> <args>` from the repository root; asserts it exited 0."""
  done = subprocess.run([sys.executable, os.path.join("bench", script), *args],
                        capture_output=True, text=True, timeout=600, cwd=ROOT,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stdout + done.stderr
  return done
