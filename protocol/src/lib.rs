//! PostgreSQL v3 wire protocol pieces the Understudy gateway needs: framing over a byte buffer,
//! typed views of the few messages it inspects, encoders for the ones it writes, and the
//! authentication primitives (SCRAM-SHA-256 with a recovered ClientKey, md5). No I/O here.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod encode;
pub mod frame;
pub mod inspect;
pub mod md5;
pub mod scram;
pub mod startup;
pub mod tags;
