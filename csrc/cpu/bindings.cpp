// CPU implementations of the sdsx ops (schemas in registration.cpp).
#include <torch/library.h>

#include "cpu/ops.h"

TORCH_LIBRARY_IMPL(sdsx, CPU, m) {
  m.impl("gram_upper_", &sdsx::cpu::gram_upper_cpu);
  m.impl("sq_colsum_", &sdsx::cpu::sq_colsum_cpu);
  m.impl("nm_mask", &sdsx::cpu::nm_mask_cpu);
  m.impl("topk_mask", &sdsx::cpu::topk_mask_cpu);
  m.impl("obs_sweep", &sdsx::cpu::obs_sweep_cpu);
  m.impl("prox_step", &sdsx::cpu::prox_step_cpu);
}
