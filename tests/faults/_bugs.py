"""Bugs in src/ the fault tests found (each has a strict xfail test in
test_destination_errors.py; the fault matrix names them when its races run into them)."""

from __future__ import annotations

BUG_ACCEPT_IGNORES_RESET = (
    "bug: transport/channels.py:accept_channels does not watch the connections it has "
    "already taken (7.2: by order; 10: once classified) while it waits for the remaining "
    "multifd channels: a source that resets them mid set-up leaves the destination in "
    "'setup' until accept_timeout (30 s), and it then fails with 'expected 2 multifd "
    "channels, got 1 after 30 s' instead of naming the reset")
BUG_INIT_RESET_UNNAMED = (
    "bug: migration/destination.py:MigrationDestination._accept -> multifd/receiver.py:"
    "Receiver.add_channel: a multifd connection reset while its init packet is read "
    "fails the migration with the bare OSError text '[Errno 104] Connection reset by "
    "peer' (neither 'multifd' nor which connection)")
BUG_CHANNEL_ERROR_LOST = (
    "bug: migration/destination.py:MigrationDestination._run: a multifd channel that fails "
    "while the loader blocks reading main (Receiver built without on_error) is only "
    "noticed when the source, failing on the fallout, drops main; the error then chosen "
    "(`self._devstate.error or str(exc)`) ignores self.receiver.error, so the destination "
    "reports 'the main channel closed early: ...' instead of 'multifd channel N failed'")
BUG_MAIN_RESET_UNNAMED = (
    "bug: migration/destination.py:MigrationDestination._load: an OSError from "
    "main.recv_into (the source reset the main channel) becomes the error as is, "
    "'[Errno 104] Connection reset by peer', without saying it was the main channel")
