#!/usr/bin/env python3
"""Runs a command on an emulated device with exactly the memory a plan needs.

usage: with_device_memory.py INFO DELTA CMD [ARG...]
  INFO   the output of `l4-run --info --device=cuda PLAN` (its "plan needs:
         N bytes" line)
  DELTA  bytes added to N (negative: fewer)
The command runs with L4C_CUEMU_MEMORY=N+DELTA; its exit status is ours.
"""
import os
import re
import subprocess
import sys

info, delta, cmd = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
need = re.search(r"^plan needs: +(\d+) bytes", open(info).read(), re.M)
if not need or not cmd:
    sys.exit("with_device_memory.py: no 'plan needs: N bytes' in %s, or no "
             "command" % info)
env = dict(os.environ, L4C_CUEMU_MEMORY=str(int(need.group(1)) + delta))
sys.exit(subprocess.call(cmd, env=env))
