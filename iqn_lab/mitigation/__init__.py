"""The mitigation lab and demo (issue 14): act on stalls at the bottleneck, measure what it saves."""
