"""The numbers that set the package's behaviour, in one place.

Each constant carries a comment saying what it sets and, where a measurement chose it, where that
measurement is recorded (``benchmarks/RESULTS.md``). They are values read by the code, never
switches assigned at run time: a setting a user may change travels as an argument or an options
object (``EngineOptions``, the clone and fit settings).
"""

from __future__ import annotations

# --- cloning ---------------------------------------------------------------------------------

# --- fitting ---------------------------------------------------------------------------------

# --- spectra, frames and files ---------------------------------------------------------------
