#include "ffn_nbits.h"
namespace ffsplit {
const NbKernels& NbKernelsAvx2() { return NbKernelsScalar(); }
}
