// Control of the bf16 GEMM path of the CPU training attention (attention_train.cpp), for
// kdfast._C (registration.cpp) and tests.
#pragma once

namespace kdfast {

// True when bf16 q/k/v can run bf16 GEMMs here: oneDNN's brgemm packs bf16 (AMX) and the CPU
// has AVX-512 (torch.backends.mkldnn.enabled is honoured: off means false).
bool attention_bf16_gemm_available();
// Whether the bf16 path is allowed (default: yes, unless KDFAST_ATTENTION_BF16_GEMM=0); it runs
// for bf16 inputs when also available and the CPU path (kdfast.cpu_isa) is AVX-512 or above.
bool attention_bf16_gemm_enabled();
void set_attention_bf16_gemm(bool enabled);
// GEMMs of the latest attention_train_fwd / _bwd call: "bf16", "fp32" ("" before any call).
const char* attention_last_gemm();

}  // namespace kdfast
