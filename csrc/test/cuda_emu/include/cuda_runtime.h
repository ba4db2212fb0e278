// Stands in for the CUDA runtime header under the emulator (csrc/test/cuda_emu/cuda_emu.h).
#pragma once
#include "../cuda_emu.h"
