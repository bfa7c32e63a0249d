#!/bin/sh
echo "coverage is not available in Synod's offline build" >&2
exit 1
