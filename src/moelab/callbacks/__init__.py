"""Lightning callbacks that show what the experts do: utilisation, specialisation, collapse alarm.

Tag names live in `moelab.callbacks.tags`; the README lists them all.
"""

from moelab.callbacks.collapse import ExpertCollapseAlarm
from moelab.callbacks.specialisation import ExpertSpecialisation
from moelab.callbacks.utilisation import ExpertUtilisation

__all__ = ["ExpertCollapseAlarm", "ExpertSpecialisation", "ExpertUtilisation"]
