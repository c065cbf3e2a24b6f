"""IQN's end-user agent: watch the player on screen, and while it stalls toggle
the autoplay switch n times every p seconds so the ISP can see the stall in band.

Modules: ``grid`` (frames to coarse grey grids), ``detector`` (sans-I/O stall
detector), ``capture`` (screen grabs), ``xinput`` (user activity from X),
``signaler`` (the toggles), ``layout``/``locate`` (where player and switch are),
``truth`` (spinner ground truth), ``agent`` (the loop), ``cli`` (``iqn-agent``).
"""
