"""Transports: migration URIs, tuned stream sockets, single-stream pipes/files, and the
per-profile ordering of the main and multifd connections."""

from multifd.transport.channels import ChannelError, accept_channels, connect_channels
from multifd.transport.exec import ExecFailed, Stream, open_stream
from multifd.transport.sockets import (
    ConnectionClosed,
    Listener,
    connect,
    recv_exactly,
    recv_exactly_into,
    sendmsg_all,
)
from multifd.transport.uri import (
    Address,
    BadUri,
    ExecCommand,
    FdAddress,
    FileAddress,
    TcpAddress,
    UnixAddress,
    parse_uri,
    supports_multifd,
)

__all__ = [
    "Address",
    "BadUri",
    "ChannelError",
    "ConnectionClosed",
    "ExecCommand",
    "ExecFailed",
    "FdAddress",
    "FileAddress",
    "Listener",
    "Stream",
    "TcpAddress",
    "UnixAddress",
    "accept_channels",
    "connect",
    "connect_channels",
    "open_stream",
    "parse_uri",
    "recv_exactly",
    "recv_exactly_into",
    "sendmsg_all",
    "supports_multifd",
]
