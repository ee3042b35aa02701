#!/bin/sh
# Scenario "vfio-freehint": freehint.ko against freehint-vfio-user.
# Same flow as vfio-stock.sh with driver=freehint mode=freehint: after the
# host's round, `fhtool vfio-round` builds freehint's bitmap over the
# device's layout (debugfs) and dumps it with /proc/kpageflags and the held
# pages.
exec sh /scenarios/vfio-stock.sh driver=freehint mode=freehint "$@"
