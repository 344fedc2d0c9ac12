"""`batchgen run` with a fault plan, for the tests that drive a job in a subprocess (a driver to SIGKILL, a job on
a test cluster): `python -m tests.run_with_faults FAULTS_JSON run JOB [options of batchgen run]`.

The production CLI has no way in for faults. This wrapper gives `run_job` the plan through its `faults`
parameter, as the in-process fault tests do, then runs the real CLI with the remaining arguments.
"""

import functools
import sys

import batchgen.job
from batchgen.cli import cli
from batchgen.faults import FaultPlan

if __name__ == "__main__":
    plan = FaultPlan.from_json(sys.argv[1])
    # `batchgen run` imports run_job from batchgen.job when it runs: it gets this one, with the plan bound.
    batchgen.job.run_job = functools.partial(batchgen.job.run_job, faults=plan)
    cli.main(args=sys.argv[2:], prog_name="batchgen")
