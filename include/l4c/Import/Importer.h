//===- Importer.h - model description -> l4 IR ---------------------------===//
//
// Resolves a model description (preset name, config.json, HF checkpoint
// folder), checks a checkpoint's tensors against the config, and builds the
// l4 module for a program.
//
//===----------------------------------------------------------------------===//
#ifndef L4C_IMPORT_IMPORTER_H
#define L4C_IMPORT_IMPORTER_H

#include "l4c/Import/Config.h"
#include "mlir/IR/BuiltinOps.h"
#include "mlir/IR/OwningOpRef.h"
#include "llvm/Support/Error.h"
#include <string>

namespace l4c {

enum class Program { Forward, Generate, Train };
llvm::StringRef programName(Program p);
std::optional<Program> parseProgram(llvm::StringRef s);

enum class Precision { F32, BF16 };
std::optional<Precision> parsePrecision(llvm::StringRef s);

/// A resolved model: its config and, when it came from a checkpoint folder,
/// that folder (whose tensors have been checked against the config).
struct ModelSource {
  Llama4Config config;
  std::string checkpointDir;
};

/// `spec` is a preset name, a config.json path, or a checkpoint directory
/// (config.json plus model.safetensors or model.safetensors.index.json).
/// A checkpoint's tensors are checked with checkCheckpoint.
llvm::Expected<ModelSource> resolveModel(llvm::StringRef spec);

/// Compares a checkpoint's tensor names and shapes with parameterList(c);
/// the error lists every missing, unexpected and mis-shaped tensor by name.
/// `language_model.` prefixes (multimodal checkpoints) are stripped and the
/// vision tower's tensors ignored.
llvm::Error checkCheckpoint(const Llama4Config &c, llvm::StringRef dir);

struct ImportOptions {
  Program program = Program::Forward;
  int64_t maxBatch = 1;
  int64_t maxSeq = 128;
  Precision precision = Precision::F32;
};

/// Builds the l4 module: @forward, or @prefill + @decode for generate.
/// Fails when the options do not fit the config (e.g. max_seq < 1).
llvm::Expected<mlir::OwningOpRef<mlir::ModuleOp>>
buildModule(mlir::MLIRContext &ctx, const Llama4Config &c,
            const ImportOptions &opts);

} // namespace l4c

#endif // L4C_IMPORT_IMPORTER_H
