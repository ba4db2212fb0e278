"""`python -m contrastive_kernels.bench [args]`: the benchmark of `make bench`.

The harness lives outside the installed package, in the source checkout's bench/
(bench/sweep.py, with bench/harness.py); this entry point runs it from there.
"""
import os
import sys


def main(argv=None):
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if not os.path.exists(os.path.join(folder, "sweep.py")):
        print("contrastive_kernels.bench: the benchmark harness is in the source checkout "
              "(bench/sweep.py), which this installation does not have; clone the repository "
              "and run `make bench` there", file=sys.stderr)
        return 2
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import sweep
    return sweep.main(argv)


if __name__ == "__main__":
    sys.exit(main())
