"""The autoplay switch's state, kept as the user left it (sans-I/O).

Every burst is even, so the switch should end where it started, but only if
every click lands: a click the page drops (a busy renderer, controls fading
in under the pointer) leaves the user's autoplay setting flipped. The agent
reads the switch's state from the page once per p; this guard compares each
reading with the state the user chose and says when one click is owed to put
it back.

The user may flip the switch too: a reading that differs while no burst of
ours is unconfirmed, or after the user pressed a button on the switch, is the
user's new choice, not a lost click.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SwitchGuard:
    #: a reading this soon after our last click may predate the page handling it
    settle: float = 0.05
    #: the state the user left the switch in (None until first read)
    user_state: bool | None = None
    #: clicks of ours not yet confirmed by a reading
    pending: bool = False
    last_click: float = float("-inf")
    #: the user pressed a button on the switch since the last reading
    touched: bool = False
    restores: int = 0

    def clicked(self, t_end: float) -> None:
        """We clicked the switch (a burst or a restore) up to ``t_end``."""
        self.pending = True
        self.last_click = max(self.last_click, t_end)

    def user_pressed(self) -> None:
        """The user pressed a mouse button on the switch: the next reading is their choice."""
        self.touched = True

    def forget(self) -> None:
        """A new page (navigation): the next reading is the user's state."""
        self.user_state = None
        self.pending = False
        self.touched = False

    def reading(self, t: float, state: bool | None) -> bool:
        """The page showed ``state`` at ``t``; True when one click is owed to restore it."""
        if state is None:
            return False
        if self.user_state is None or self.touched:
            self.user_state, self.pending, self.touched = state, False, False
            return False
        if t - self.last_click < self.settle:
            return False  # our clicks may still be on their way: judge at the next reading
        if state == self.user_state:
            self.pending = False
            return False
        if self.pending:
            self.restores += 1
            return True  # the caller clicks once and reports it with clicked()
        self.user_state = state  # changed with no click of ours outstanding: the user's (or the page's) doing
        return False
