"""The protocol between processes: sockets, message constructors, credit dispatch, paths as one line of text."""
