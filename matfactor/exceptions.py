"""Warnings raised by matfactor's iterative solvers."""

__all__ = ["ConvergenceWarning"]


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped at its iteration limit before meeting its tolerance.

    The result is the last iterate: usable, but not the solution to the requested accuracy.
    """
