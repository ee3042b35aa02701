#!/bin/sh
# Scenario "vfio-hostile": the hostile driver `fhtool hostile`
# (tests/guest-tools/src/hostile.rs) drives our device with garbage first;
# then the stock driver must bind again and the vfio-stock checks run.
exec sh /scenarios/vfio-stock.sh hostile=4000 "$@"
