"""The synthetic world of the `tiny` miniature: the web (samples, renders, faults, ground truth), its loopback
server and index, the curated source, and the tiny evaluation suite's generated tasks. It imports the core only."""
