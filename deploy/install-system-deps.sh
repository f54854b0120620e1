#!/usr/bin/env bash
# System packages the test suite needs: DCMTK (storescu/storescp/dsrdump/dsr2html),
# dicom3tools (dciodvfy), Orthanc (a real PACS, started by the tests with their own config and
# ports) and Chromium (headless, renders dsr2html's page of the SR). Installs only what is
# missing; needs root or sudo for apt-get.
set -euo pipefail

need=()
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
{ command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ]; } || need+=(orthanc)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# the reliability and security tests: certificates for DICOM TLS, and a Redis of their own
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
[ ${#need[@]} -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing system packages: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
