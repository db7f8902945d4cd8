//! SCRAM-SHA-256 (RFC 5802/7677) as PostgreSQL uses it, sans-I/O.
