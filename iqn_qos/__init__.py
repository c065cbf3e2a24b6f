"""iqn_qos: where do the stalls come from?

A QoSaaS-style service (Wang et al., "QoSaaS: Quality of Service as a Service"):
media lines (one session's path through system components, n units measured,
m of them good) in, per-component degradation estimates out, by maximum
likelihood.  Layering: the engine modules (``lines``, ``topology`` parsing
helpers, ``mle``, ``predict``) do no I/O; ``store`` and ``io`` read files and
DuckDB; ``cli`` sits on top.  Nothing here imports ``iqn_ctl``, ``iqn_lab`` or
``user_agent``.
"""

from .errors import QosError

__all__ = ["QosError"]
