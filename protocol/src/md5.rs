//! md5 password authentication helpers.
