"""iqn_qos: where do the stalls come from?

A QoSaaS-style service (Wang et al., "QoSaaS: Quality of Service as a Service"):
media lines (one session's path through system components, n units measured,
m of them good) in, per-component degradation estimates out, by maximum
likelihood.  Layering: the engine modules (``lines``, ``topology`` parsing
helpers, ``mle``, ``predict``) do no I/O; ``store`` and ``io`` read files and
DuckDB; ``cli`` sits on top.  Nothing here imports ``iqn_ctl``, ``iqn_lab`` or
``user_agent``.
"""

import os

# One BLAS thread: a slot's matrices are a few hundred wide, and threaded BLAS on a
# busy 2-core box made one slot 10-40x slower (0.25 s -> 3.4-5.9 s for 20,000
# lines) from threads spinning against each other.  setdefault: the user's choice
# wins; it only takes effect when numpy is first imported after this package.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from .errors import QosError  # noqa: E402

__all__ = ["QosError"]
