# lit configuration for l4c: FileCheck tests of the dialects, passes, import
# and the command-line tools.
import os

import lit.formats
from lit.llvm import llvm_config

config.name = "l4c"
config.test_format = lit.formats.ShTest(not llvm_config.use_lit_shell)
config.suffixes = [".mlir", ".test"]
config.excludes = ["CMakeLists.txt", "lit.cfg.py", "lit.site.cfg.py", "data", "unit", "Inputs"]
config.test_source_root = os.path.dirname(__file__)
config.test_exec_root = os.path.join(config.l4c_obj_root, "test")

config.substitutions.append(("%golden", os.path.join(config.l4c_src_root, "test", "data", "golden")))
config.substitutions.append(("%testdata", os.path.join(config.l4c_src_root, "test", "data")))
config.substitutions.append(("%extra", os.path.join(config.l4c_src_root, "test", "data", "golden-extra")))

# L4C_CUEMU_ORDER: the emulator's block and thread order (shim.h), so that
# `L4C_CUEMU_ORDER=reverse lit test/cuemu` looks for races.
llvm_config.with_system_environment(["HOME", "TMPDIR", "L4C_CUEMU_ORDER"])
llvm_config.use_default_substitutions()
tool_dirs = [config.l4c_tools_dir, config.llvm_tools_dir]
llvm_config.add_tool_substitutions(["l4c", "l4-opt", "l4-run", "l4-tune", "l4-compare", "not", "count", "split-file", "FileCheck"], tool_dirs)
config.substitutions.append(("%python", "/usr/bin/python3"))

# The CUDA driver emulator (runtime/test/cuemu): the GPU path on the host.
cuemu = os.path.join(config.l4c_obj_root, "runtime", "libl4cuemu.so")
if os.path.exists(cuemu):
    config.available_features.add("cuemu")
    config.substitutions.append(
        ("%cuemu-env", "env L4C_CUDA_DRIVER=%s L4C_CUDA_IMAGE=source L4C_CUEMU_DIR=%s"
         % (cuemu, os.path.join(config.l4c_obj_root, "cuemu-cache"))))
