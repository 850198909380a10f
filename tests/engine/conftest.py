"""Engine tests: every test checks that no multifd thread is left behind."""

from tests.engine._engine import no_thread_left_behind

__all__ = ["no_thread_left_behind"]
