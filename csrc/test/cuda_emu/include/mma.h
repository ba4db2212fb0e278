// nvcuda::wmma under the emulator: defined in csrc/test/cuda_emu/cuda_emu.h.
#pragma once
#include "../cuda_emu.h"
