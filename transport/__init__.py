"""The transport library: aiortc data-channel links, the optional SCTP tuning (applied
explicitly by the process that wants it), the event-loop choice and identity files. Imported by
the server and by native nodes alike; never imports `server` or `native_node`."""
