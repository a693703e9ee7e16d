#!/bin/sh
# Runs a command (a pip install) with pip trusting the certificates of the EXTRA_CA_CERTS build
# argument besides its own bundle: the CA of a TLS-inspecting proxy, as PEM text. Without it the
# command runs as it is. The combined bundle is a temporary file, removed when the command ends,
# so it is in no layer of the image.
#
#   RUN /usr/local/share/lr-sweep/pip-ca.sh python3 -m pip install ...
set -eu
if [ -n "${EXTRA_CA_CERTS:-}" ]; then
    bundle=$(mktemp)
    trap 'rm -f "$bundle"' EXIT
    python3 -c 'import pip._vendor.certifi as c; print(open(c.where()).read())' >"$bundle"
    printf '%s\n' "$EXTRA_CA_CERTS" >>"$bundle"
    PIP_CERT=$bundle "$@"
else
    exec "$@"
fi
