"""A recording's way from a drop folder to a usable remote copy: its states (lifecycle), the watcher and intake,
the conversion (with ffmpeg, in transcode), the upload and the remote lifecycle (ledger, eviction, expiry,
reconciliation), and the pure arithmetic of the quota."""
