#!/usr/bin/env python3
"""upsmonTLS: placeholder until its issue lands."""
import sys

print("usage: upsmonTLS.py [options] (not implemented yet)", file=sys.stderr)
sys.exit(2)
