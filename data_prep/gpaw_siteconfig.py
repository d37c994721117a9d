# GPAW build configuration for `GPAW_CONFIG=$PWD/data_prep/gpaw_siteconfig.py pip install gpaw`:
# link Debian's libxc and OpenBLAS (apt-get install libxc-dev libopenblas-dev); without
# naming them GPAW silently builds without BLAS. No MPI, FFTW or ScaLAPACK: one process per material.
compiler = 'gcc'
cpp_compiler = 'g++'
libraries = ['xc', 'openblas']
library_dirs = ['/usr/lib/x86_64-linux-gnu']
include_dirs = ['/usr/include']
fftw = False
scalapack = False
mpi = False
noblas = False
