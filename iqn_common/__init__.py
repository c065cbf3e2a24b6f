"""What every command of the router side shares and nothing else owns: the
``--version`` line and the long-running commands' logging. It sits below
``iqn_ctl``, ``iqn_lab`` and ``iqn_qos`` and imports none of them, so the QoS
service can stay its own room and still print the same shapes as the agent.
``user_agent`` keeps its own copy of the version line: the end-user agent
imports nothing of the project (docs/architecture.md)."""
