#!/usr/bin/env bash
# make_certs.sh OUTDIR — a private CA and a SuperLink server certificate signed by it.
# The server cert needs subjectAltName DNS:localhost,IP:127.0.0.1 (+ SERVER_SAN, e.g.
# "IP:10.0.0.5,DNS:link.example") and extendedKeyUsage serverAuth, or nodes refuse it.
set -euo pipefail
OUT="${1:?usage: make_certs.sh OUTDIR}"
SAN="DNS:localhost,IP:127.0.0.1${SERVER_SAN:+,$SERVER_SAN}"
mkdir -p "$OUT" && cd "$OUT"
openssl genrsa -out ca.key 4096 2>/dev/null
openssl req -x509 -new -key ca.key -sha256 -days 365 -subj "/CN=lte-fed CA" -out ca.crt
openssl genrsa -out server.key 4096 2>/dev/null
openssl req -new -key server.key -subj "/CN=localhost" -out server.csr
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' "$SAN" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256 \
  -extfile server.ext -out server.crt 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key
openssl verify -CAfile ca.crt server.crt
echo "CA: $OUT/ca.crt  server: $OUT/server.crt $OUT/server.key (SAN $SAN)"
