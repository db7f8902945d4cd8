#!/bin/bash
# Runs once in the primary's fresh data directory: a replication role, a demo role and database.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username postgres <<'SQL'
CREATE ROLE replicator REPLICATION LOGIN PASSWORD 'replicator';
CREATE ROLE app LOGIN PASSWORD 'app';
CREATE DATABASE app OWNER app;
SQL
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
