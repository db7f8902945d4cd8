//! SCRAM-SHA-256 (RFC 5802/7677) as PostgreSQL uses it, sans-I/O.
//!
//! Three roles, all byte-exact with PostgreSQL 15 (`src/backend/libpq/auth-scram.c`,
//! `src/interfaces/libpq/fe-auth-scram.c`):
//! - [`recover_client_key`]: the gateway relays a client's exchange with PostgreSQL and, knowing
//!   the verifier, recovers the ClientKey from the client's proof.
//! - [`ScramServer`]: the gateway authenticates a client itself against a verifier.
//! - [`ScramClient`]: the gateway logs in to PostgreSQL with a password or a recovered
//!   ClientKey; the latter is how a session logs in to a new primary after a failover without
//!   any plaintext.
//!
//! Messages are handled as bytes; the framing layer supplies the SASL payloads. Channel binding
//! (SCRAM-SHA-256-PLUS, `tls-server-end-point`) is offered by [`ScramServer`] when its caller
//! knows the binding data of the TLS connection the exchange runs on; relayed exchanges and
//! [`ScramClient`] do not bind.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Length of SHA-256 output and of every SCRAM key (`SCRAM_KEY_LEN` in PostgreSQL).
const KEY_LEN: usize = 32;
/// Random bytes in a nonce before base64 (`SCRAM_RAW_NONCE_LEN` in PostgreSQL).
const RAW_NONCE_LEN: usize = 18;
/// The `pg_authid` prefix of a SCRAM-SHA-256 secret.
const VERIFIER_PREFIX: &str = "SCRAM-SHA-256$";
/// The only gs2 header this client sends: no channel binding, no authzid (as libpq without TLS).
const CLIENT_GS2_HEADER: &str = "n,,";
/// The highest iteration count [`ScramClient`] runs PBKDF2 for. A server (or whoever impersonates
/// it) picks the count, so an unbounded one is a denial of service; this is the cap
/// postgres-protocol and pgjdbc use (CVE-2026-42198).
pub const MAX_CLIENT_ITERATIONS: u32 = 100_000;

/// What went wrong in a SCRAM exchange or with a SCRAM secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// A message does not follow the RFC 5802 grammar; names the part that is wrong.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The peer uses a SCRAM feature PostgreSQL does not support (authzid, mandatory extensions).
    #[error("unsupported SCRAM feature: {0}")]
    Unsupported(&'static str),
    /// The client asked for channel binding (`p=`), but only SCRAM-SHA-256 without PLUS is offered.
    #[error("SCRAM channel binding is not supported")]
    ChannelBindingUnsupported,
    /// The client asked for a channel-binding type other than `tls-server-end-point`.
    #[error("unsupported SCRAM channel-binding type")]
    ChannelBindingType,
    /// The client said it could bind but believed the server could not (`y`), where the server
    /// offered SCRAM-SHA-256-PLUS: a sign that someone in between removed the offer.
    #[error("SCRAM channel binding negotiation error: the client supports SCRAM channel binding but thinks the server does not. However, this server does support channel binding.")]
    ChannelBindingDowngrade,
    /// The mechanism the client selected and its gs2 header disagree on channel binding.
    #[error("{0}")]
    ChannelBindingSelection(&'static str),
    /// The `c=` attribute does not match the gs2 header of the client-first-message.
    #[error("unexpected SCRAM channel-binding attribute in client-final-message")]
    ChannelBindingMismatch,
    /// The nonce is not the one this exchange uses.
    #[error("SCRAM nonce mismatch")]
    NonceMismatch,
    /// The client's proof does not match the verifier: wrong password.
    #[error("invalid SCRAM client proof")]
    InvalidProof,
    /// The server's signature is wrong: it does not know the verifier.
    #[error("invalid SCRAM server signature")]
    InvalidServerSignature,
    /// The server ended the exchange with `e=`; holds the server's error value.
    #[error("SCRAM error from server: {0}")]
    ServerError(String),
    /// The server asked for more PBKDF2 iterations than [`MAX_CLIENT_ITERATIONS`].
    #[error("SCRAM iteration count {0} exceeds the limit of {MAX_CLIENT_ITERATIONS}")]
    TooManyIterations(u32),
    /// A `pg_authid`-style secret could not be parsed; names the part that is wrong.
    #[error("invalid SCRAM-SHA-256 verifier: {0}")]
    InvalidVerifier(&'static str),
    /// A method was called in the wrong state of the exchange.
    #[error("SCRAM message out of order: {0}")]
    OutOfOrder(&'static str),
}

/// A SCRAM-SHA-256 secret as stored in `pg_authid.rolpassword`.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct ScramVerifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; KEY_LEN],
    server_key: [u8; KEY_LEN],
}

impl ScramVerifier {
    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 fields).
    pub fn parse(secret: &str) -> Result<Self, ScramError> {
        let rest = secret
            .strip_prefix(VERIFIER_PREFIX)
            .ok_or(ScramError::InvalidVerifier("missing SCRAM-SHA-256$ prefix"))?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or(ScramError::InvalidVerifier("missing keys"))?;
        let (iterations, salt) = params
            .split_once(':')
            .ok_or(ScramError::InvalidVerifier("missing salt"))?;
        let (stored_key, server_key) = keys
            .split_once(':')
            .ok_or(ScramError::InvalidVerifier("missing ServerKey"))?;
        Ok(Self {
            iterations: parse_iterations(iterations.as_bytes())
                .ok_or(ScramError::InvalidVerifier("iteration count"))?,
            salt: BASE64
                .decode(salt)
                .map_err(|_| ScramError::InvalidVerifier("salt"))?,
            stored_key: decode_key(stored_key.as_bytes())
                .ok_or(ScramError::InvalidVerifier("StoredKey"))?,
            server_key: decode_key(server_key.as_bytes())
                .ok_or(ScramError::InvalidVerifier("ServerKey"))?,
        })
    }

    /// Derives the verifier PostgreSQL stores for `password` with this salt and iteration count.
    pub fn from_password(
        password: &[u8],
        salt: &[u8],
        iterations: u32,
    ) -> Result<Self, ScramError> {
        if iterations == 0 {
            return Err(ScramError::InvalidVerifier("iteration count"));
        }
        let salted = salted_password(password, salt, iterations);
        Ok(Self {
            iterations,
            salt: salt.to_vec(),
            stored_key: ClientKey::from_salted_password(&salted).stored_key(),
            server_key: hmac(salted.as_slice(), &[b"Server Key"]),
        })
    }

    /// The PBKDF2 iteration count.
    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    /// The salt, decoded.
    pub fn salt(&self) -> &[u8] {
        &self.salt
    }

    /// StoredKey = SHA-256(ClientKey).
    pub fn stored_key(&self) -> &[u8; KEY_LEN] {
        &self.stored_key
    }

    /// ServerKey = HMAC(SaltedPassword, "Server Key"); proves the server to the client.
    pub fn server_key(&self) -> &[u8; KEY_LEN] {
        &self.server_key
    }
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

/// A SCRAM ClientKey: enough to log in to any server holding the matching verifier.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct ClientKey([u8; KEY_LEN]);

impl ClientKey {
    fn from_salted_password(salted: &[u8; KEY_LEN]) -> Self {
        Self(hmac(salted, &[b"Client Key"]))
    }

    /// StoredKey = SHA-256(ClientKey), what the server's verifier holds.
    pub fn stored_key(&self) -> [u8; KEY_LEN] {
        Sha256::digest(self.0).into()
    }

    /// ClientProof = ClientKey XOR HMAC(StoredKey, AuthMessage).
    fn proof(&self, auth_message: &[u8]) -> [u8; KEY_LEN] {
        xor(&self.0, &hmac(&self.stored_key(), &[auth_message]))
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientKey(..)")
    }
}

/// Recovers the ClientKey from a relayed SCRAM exchange between a client and PostgreSQL.
///
/// The arguments are the raw SASL payloads: SASLInitialResponse (client-first-message with gs2
/// header), AuthenticationSASLContinue (server-first-message) and SASLResponse
/// (client-final-message). Fails with [`ScramError::InvalidProof`] when the proof does not match
/// `verifier` (wrong password, or the password changed since the verifier was read).
pub fn recover_client_key(
    verifier: &ScramVerifier,
    client_first: &[u8],
    server_first: &[u8],
    client_final: &[u8],
) -> Result<ClientKey, ScramError> {
    let first = parse_client_first(client_first)?;
    if matches!(first.flag, Gs2Flag::Bind(_)) {
        return Err(ScramError::ChannelBindingUnsupported);
    }
    let server = parse_server_first(server_first)?;
    let last = parse_client_final(client_final)?;
    if !server.nonce.starts_with(first.nonce) || last.nonce != server.nonce {
        return Err(ScramError::NonceMismatch);
    }
    let auth_message = auth_message(first.bare, server_first, last.without_proof);
    verify_proof(verifier, &auth_message, &last.proof)
}

/// The server side of an exchange: the gateway authenticates a client against a verifier.
pub struct ScramServer {
    verifier: ScramVerifier,
    state: ServerState,
    binding: Option<Binding>,
}

/// The channel binding a [`ScramServer`] offers.
struct Binding {
    /// `tls-server-end-point` data: the hash of the server's certificate (RFC 5929).
    end_point: Vec<u8>,
    /// Whether the client selected SCRAM-SHA-256-PLUS.
    selected: bool,
}

/// The name of the SCRAM mechanism with channel binding.
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The one channel-binding type PostgreSQL (and this module) supports.
const END_POINT: &[u8] = b"tls-server-end-point";

enum ServerState {
    AwaitingClientFirst {
        server_nonce: String,
    },
    AwaitingClientFinal {
        /// The `c=` value the client must send back: base64 of its gs2 header, and of the
        /// channel-binding data if it binds.
        expected_channel_binding: Vec<u8>,
        nonce: Vec<u8>,
        client_first_bare: Vec<u8>,
        server_first: Vec<u8>,
    },
    /// Finished, successfully or not; an exchange is never resumed after an error.
    Done,
}

impl ScramServer {
    /// Starts an exchange with the given server nonce (printable ASCII without `,`).
    pub fn new(verifier: ScramVerifier, server_nonce: String) -> Self {
        Self {
            verifier,
            state: ServerState::AwaitingClientFirst { server_nonce },
            binding: None,
        }
    }

    /// Offers channel binding: the exchange runs on a TLS connection whose
    /// `tls-server-end-point` data is `end_point` (SCRAM-SHA-256-PLUS was advertised), and
    /// the client `selected` SCRAM-SHA-256-PLUS or not. As PostgreSQL, a client that selected
    /// it must bind, and one that did not must not claim it could have (`y`).
    pub fn offer_channel_binding(mut self, end_point: Vec<u8>, selected: bool) -> Self {
        self.binding = Some(Binding {
            end_point,
            selected,
        });
        self
    }

    /// Starts an exchange with a random nonce: 18 random bytes in base64, as PostgreSQL does.
    pub fn with_random_nonce(verifier: ScramVerifier) -> Self {
        Self::new(verifier, random_nonce())
    }

    /// Takes the client-first-message (SASLInitialResponse data), returns the server-first-message.
    pub fn handle_client_first(&mut self, client_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        let ServerState::AwaitingClientFirst { server_nonce } =
            std::mem::replace(&mut self.state, ServerState::Done)
        else {
            return Err(ScramError::OutOfOrder("client-first-message"));
        };
        let first = parse_client_first(client_first)?;
        let expected_channel_binding = self.expected_channel_binding(&first)?;
        let mut nonce = first.nonce.to_vec();
        nonce.extend_from_slice(server_nonce.as_bytes());

        let mut server_first = b"r=".to_vec();
        server_first.extend_from_slice(&nonce);
        server_first.extend_from_slice(
            format!(
                ",s={},i={}",
                BASE64.encode(&self.verifier.salt),
                self.verifier.iterations
            )
            .as_bytes(),
        );
        self.state = ServerState::AwaitingClientFinal {
            expected_channel_binding,
            nonce,
            client_first_bare: first.bare.to_vec(),
            server_first: server_first.clone(),
        };
        Ok(server_first)
    }

    /// Takes the client-final-message (SASLResponse data); on a valid proof returns the
    /// server-final-message (for AuthenticationSASLFinal) and the client's ClientKey.
    pub fn handle_client_final(
        &mut self,
        client_final: &[u8],
    ) -> Result<(Vec<u8>, ClientKey), ScramError> {
        let ServerState::AwaitingClientFinal {
            expected_channel_binding,
            nonce,
            client_first_bare,
            server_first,
        } = std::mem::replace(&mut self.state, ServerState::Done)
        else {
            return Err(ScramError::OutOfOrder("client-final-message"));
        };
        let last = parse_client_final(client_final)?;
        // Public data (the gs2 header and the certificate's hash): compared in constant time
        // all the same.
        if !bool::from(last.channel_binding.ct_eq(&expected_channel_binding)) {
            return Err(ScramError::ChannelBindingMismatch);
        }
        if last.nonce != nonce.as_slice() {
            return Err(ScramError::NonceMismatch);
        }
        let auth_message = auth_message(&client_first_bare, &server_first, last.without_proof);
        let client_key = verify_proof(&self.verifier, &auth_message, &last.proof)?;
        let signature = hmac(&self.verifier.server_key, &[&auth_message]);
        Ok((server_final_message(&signature), client_key))
    }

    /// The `c=` the client-final-message must carry after `first`, checked against what was
    /// offered and selected as PostgreSQL's `read_client_first_message` checks it.
    fn expected_channel_binding(&self, first: &ClientFirst<'_>) -> Result<Vec<u8>, ScramError> {
        let selected = self.binding.as_ref().is_some_and(|b| b.selected);
        let mut header = first.gs2_header.to_vec();
        match (first.flag, &self.binding) {
            (Gs2Flag::Bind(_), None) => return Err(ScramError::ChannelBindingUnsupported),
            (Gs2Flag::Bind(_), Some(_)) if !selected => {
                return Err(ScramError::ChannelBindingSelection(
                    "The client selected SCRAM-SHA-256 without channel binding, but the SCRAM message includes channel binding data.",
                ))
            }
            (Gs2Flag::Bind(kind), Some(binding)) => {
                if kind != END_POINT {
                    return Err(ScramError::ChannelBindingType);
                }
                header.extend_from_slice(&binding.end_point);
            }
            (Gs2Flag::No | Gs2Flag::Yes, _) if selected => {
                return Err(ScramError::ChannelBindingSelection(
                    "The client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include channel binding data.",
                ))
            }
            (Gs2Flag::Yes, Some(_)) => return Err(ScramError::ChannelBindingDowngrade),
            (Gs2Flag::No | Gs2Flag::Yes, _) => {}
        }
        Ok(BASE64.encode(header).into_bytes())
    }
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            ServerState::AwaitingClientFirst { .. } => "AwaitingClientFirst",
            ServerState::AwaitingClientFinal { .. } => "AwaitingClientFinal",
            ServerState::Done => "Done",
        };
        f.debug_struct("ScramServer")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

/// The client side of an exchange: the gateway logs in to PostgreSQL.
pub struct ScramClient {
    credentials: Credentials,
    state: ClientState,
}

enum Credentials {
    Password(Zeroizing<Vec<u8>>),
    ClientKey {
        client_key: ClientKey,
        server_key: Option<Zeroizing<[u8; KEY_LEN]>>,
    },
}

enum ClientState {
    Initial,
    AwaitingServerFirst {
        nonce: String,
        client_first_bare: String,
    },
    AwaitingServerFinal {
        /// None when logging in with a ClientKey whose ServerKey is unknown.
        expected_signature: Option<[u8; KEY_LEN]>,
    },
    /// Finished, successfully or not; an exchange is never resumed after an error.
    Done,
}

impl ScramClient {
    /// Logs in with a password; SaltedPassword is derived from the server's salt and iterations.
    pub fn with_password(password: &[u8]) -> Self {
        Self {
            credentials: Credentials::Password(Zeroizing::new(password.to_vec())),
            state: ClientState::Initial,
        }
    }

    /// Logs in with a ClientKey (e.g. from [`recover_client_key`]); the server is authenticated
    /// only if its ServerKey is given, otherwise any well-formed server-final-message is accepted.
    pub fn with_client_key(client_key: ClientKey, server_key: Option<[u8; KEY_LEN]>) -> Self {
        Self {
            credentials: Credentials::ClientKey {
                client_key,
                server_key: server_key.map(Zeroizing::new),
            },
            state: ClientState::Initial,
        }
    }

    /// Starts (or restarts) the exchange; returns the client-first-message (SASLInitialResponse).
    pub fn client_first(&mut self) -> Vec<u8> {
        self.start(random_nonce())
    }

    fn start(&mut self, nonce: String) -> Vec<u8> {
        // The user name is empty, as libpq sends it: PostgreSQL takes it from the startup packet.
        let client_first_bare = format!("n=,r={nonce}");
        let message = format!("{CLIENT_GS2_HEADER}{client_first_bare}").into_bytes();
        self.state = ClientState::AwaitingServerFirst {
            nonce,
            client_first_bare,
        };
        message
    }

    /// Takes the server-first-message (AuthenticationSASLContinue data) and returns the
    /// client-final-message for SASLResponse.
    pub fn handle_server_first(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        let ClientState::AwaitingServerFirst {
            nonce,
            client_first_bare,
        } = std::mem::replace(&mut self.state, ClientState::Done)
        else {
            return Err(ScramError::OutOfOrder("server-first-message"));
        };
        let server = parse_server_first(server_first)?;
        // The server must add a nonce of its own, or the exchange could be a replay.
        if server.nonce.len() <= nonce.len() || !server.nonce.starts_with(nonce.as_bytes()) {
            return Err(ScramError::NonceMismatch);
        }

        let (client_key, server_key) = match &self.credentials {
            Credentials::Password(password) => {
                if server.iterations > MAX_CLIENT_ITERATIONS {
                    return Err(ScramError::TooManyIterations(server.iterations));
                }
                let salted = salted_password(password, &server.salt, server.iterations);
                let server_key = Zeroizing::new(hmac(salted.as_slice(), &[b"Server Key"]));
                (ClientKey::from_salted_password(&salted), Some(server_key))
            }
            Credentials::ClientKey {
                client_key,
                server_key,
            } => (client_key.clone(), server_key.clone()),
        };

        let mut client_final = format!("c={},r=", BASE64.encode(CLIENT_GS2_HEADER)).into_bytes();
        client_final.extend_from_slice(server.nonce);
        let auth_message = auth_message(client_first_bare.as_bytes(), server_first, &client_final);
        let proof = client_key.proof(&auth_message);
        client_final.extend_from_slice(b",p=");
        client_final.extend_from_slice(BASE64.encode(proof).as_bytes());

        self.state = ClientState::AwaitingServerFinal {
            expected_signature: server_key.map(|key| hmac(key.as_slice(), &[&auth_message])),
        };
        Ok(client_final)
    }

    /// Takes the server-final-message (AuthenticationSASLFinal data) and checks the server's
    /// signature when the ServerKey is known.
    pub fn handle_server_final(&mut self, server_final: &[u8]) -> Result<(), ScramError> {
        let ClientState::AwaitingServerFinal { expected_signature } =
            std::mem::replace(&mut self.state, ClientState::Done)
        else {
            return Err(ScramError::OutOfOrder("server-final-message"));
        };
        let signature = parse_server_final(server_final)?;
        match expected_signature {
            Some(expected) if !bool::from(expected[..].ct_eq(&signature[..])) => {
                Err(ScramError::InvalidServerSignature)
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            ClientState::Initial => "Initial",
            ClientState::AwaitingServerFirst { .. } => "AwaitingServerFirst",
            ClientState::AwaitingServerFinal { .. } => "AwaitingServerFinal",
            ClientState::Done => "Done",
        };
        f.debug_struct("ScramClient")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

/// The gs2 channel-binding flag of a client-first-message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gs2Flag<'a> {
    /// `n`: the client does not bind.
    No,
    /// `y`: the client could bind, but believes the server cannot.
    Yes,
    /// `p=<type>`: the client binds, with this channel-binding type.
    Bind(&'a [u8]),
}

struct ClientFirst<'a> {
    flag: Gs2Flag<'a>,
    /// The gs2 header as sent (through its second comma), which the client-final-message's
    /// `c=` repeats, in base64, followed by the channel-binding data if it binds.
    gs2_header: &'a [u8],
    bare: &'a [u8],
    nonce: &'a [u8],
}

/// `gs2-cbind-flag "," [authzid] "," [reserved-mext ","] username "," nonce ["," extensions]`,
/// checked as PostgreSQL's `read_client_first_message` does.
fn parse_client_first(message: &[u8]) -> Result<ClientFirst<'_>, ScramError> {
    let mut gs2 = message.splitn(3, |&b| b == b',');
    let flag = match gs2.next() {
        Some(b"n") => Gs2Flag::No,
        Some(b"y") => Gs2Flag::Yes,
        Some([b'p', b'=', kind @ ..]) => Gs2Flag::Bind(kind),
        _ => return Err(ScramError::Malformed("channel-binding flag")),
    };
    match gs2.next() {
        Some([]) => {}
        Some([b'a', b'=', ..]) => return Err(ScramError::Unsupported("authorization identity")),
        _ => return Err(ScramError::Malformed("gs2 header")),
    }
    let bare = gs2
        .next()
        .ok_or(ScramError::Malformed("client-first-message-bare"))?;
    let gs2_header = &message[..message.len() - bare.len()];
    let mut attrs = split_attrs(bare);
    let first = attrs.next();
    if let Some([b'm', b'=', ..]) = first {
        return Err(ScramError::Unsupported("mandatory extension"));
    }
    // The user name is ignored: PostgreSQL takes it from the startup packet.
    attr(first, b'n').ok_or(ScramError::Malformed("user name"))?;
    let nonce = attr(attrs.next(), b'r').ok_or(ScramError::Malformed("nonce"))?;
    if !is_printable(nonce) {
        return Err(ScramError::Malformed("nonce"));
    }
    if !attrs.all(is_attr) {
        return Err(ScramError::Malformed("extension in client-first-message"));
    }
    Ok(ClientFirst {
        flag,
        gs2_header,
        bare,
        nonce,
    })
}

struct ServerFirst<'a> {
    nonce: &'a [u8],
    salt: Vec<u8>,
    iterations: u32,
}

/// `nonce "," salt "," iteration-count`, strict as libpq's `read_server_first_message`.
fn parse_server_first(message: &[u8]) -> Result<ServerFirst<'_>, ScramError> {
    let mut attrs = split_attrs(message);
    let nonce = attr(attrs.next(), b'r')
        .filter(|n| is_printable(n))
        .ok_or(ScramError::Malformed("nonce"))?;
    let salt = attr(attrs.next(), b's')
        .and_then(|s| BASE64.decode(s).ok())
        .ok_or(ScramError::Malformed("salt"))?;
    let iterations = attr(attrs.next(), b'i')
        .and_then(parse_iterations)
        .ok_or(ScramError::Malformed("iteration count"))?;
    if attrs.next().is_some() {
        return Err(ScramError::Malformed(
            "garbage at end of server-first-message",
        ));
    }
    Ok(ServerFirst {
        nonce,
        salt,
        iterations,
    })
}

struct ClientFinal<'a> {
    channel_binding: &'a [u8],
    nonce: &'a [u8],
    without_proof: &'a [u8],
    proof: [u8; KEY_LEN],
}

/// `channel-binding "," nonce ["," extensions] "," proof`; the proof must come last.
fn parse_client_final(message: &[u8]) -> Result<ClientFinal<'_>, ScramError> {
    let mut halves = message.rsplitn(2, |&b| b == b',');
    let proof = halves
        .next()
        .and_then(|p| attr(Some(p), b'p'))
        .and_then(decode_key)
        .ok_or(ScramError::Malformed("proof"))?;
    let without_proof = halves
        .next()
        .ok_or(ScramError::Malformed("client-final-message"))?;
    let mut attrs = split_attrs(without_proof);
    let channel_binding =
        attr(attrs.next(), b'c').ok_or(ScramError::Malformed("channel binding"))?;
    let nonce = attr(attrs.next(), b'r').ok_or(ScramError::Malformed("nonce"))?;
    if !attrs.all(|a| is_attr(a) && !a.starts_with(b"p=")) {
        return Err(ScramError::Malformed("extension in client-final-message"));
    }
    Ok(ClientFinal {
        channel_binding,
        nonce,
        without_proof,
        proof,
    })
}

/// `"v=" base64` or `"e=" server-error-value`, strict as libpq's `read_server_final_message`.
fn parse_server_final(message: &[u8]) -> Result<[u8; KEY_LEN], ScramError> {
    if let [b'e', b'=', error @ ..] = message {
        return Err(ScramError::ServerError(
            String::from_utf8_lossy(error).into_owned(),
        ));
    }
    attr(Some(message), b'v')
        .and_then(decode_key)
        .ok_or(ScramError::Malformed("server signature"))
}

fn server_final_message(signature: &[u8; KEY_LEN]) -> Vec<u8> {
    format!("v={}", BASE64.encode(signature)).into_bytes()
}

/// AuthMessage = client-first-message-bare "," server-first-message "," client-final-without-proof.
fn auth_message(client_first_bare: &[u8], server_first: &[u8], without_proof: &[u8]) -> Vec<u8> {
    [client_first_bare, server_first, without_proof].join(&b","[..])
}

/// ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage), accepted iff its SHA-256 is StoredKey.
fn verify_proof(
    verifier: &ScramVerifier,
    auth_message: &[u8],
    proof: &[u8; KEY_LEN],
) -> Result<ClientKey, ScramError> {
    let signature = hmac(&verifier.stored_key, &[auth_message]);
    let client_key = ClientKey(xor(proof, &signature));
    if bool::from(client_key.stored_key()[..].ct_eq(&verifier.stored_key[..])) {
        Ok(client_key)
    } else {
        Err(ScramError::InvalidProof)
    }
}

fn split_attrs(message: &[u8]) -> impl Iterator<Item = &[u8]> {
    message.split(|&b| b == b',')
}

/// The value of `part` if it is the attribute `name=value`.
fn attr(part: Option<&[u8]>, name: u8) -> Option<&[u8]> {
    match part? {
        [n, b'=', value @ ..] if *n == name => Some(value),
        _ => None,
    }
}

/// RFC 5802 `attr-val`: one ASCII letter, `=`, a value.
fn is_attr(part: &[u8]) -> bool {
    matches!(part, [n, b'=', ..] if n.is_ascii_alphabetic())
}

/// RFC 5802 `printable`: 0x21..=0x7E except `,`; PostgreSQL rejects other nonces.
fn is_printable(nonce: &[u8]) -> bool {
    !nonce.is_empty()
        && nonce
            .iter()
            .all(|&b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// A positive decimal iteration count.
fn parse_iterations(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits)
        .ok()?
        .parse()
        .ok()
        .filter(|&i| i > 0)
}

fn decode_key(base64: &[u8]) -> Option<[u8; KEY_LEN]> {
    BASE64.decode(base64).ok()?.try_into().ok()
}

fn random_nonce() -> String {
    BASE64.encode(rand::random::<[u8; RAW_NONCE_LEN]>())
}

/// SaltedPassword = Hi(password, salt, i), which is PBKDF2-HMAC-SHA-256 with a 32-byte output.
fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> Zeroizing<[u8; KEY_LEN]> {
    // As PostgreSQL (pg_saslprep): UTF-8 passwords are normalized with SASLprep; a password that
    // is not UTF-8, or that SASLprep rejects, is used as the raw bytes.
    let prepared = std::str::from_utf8(password)
        .ok()
        .and_then(|p| stringprep::saslprep(p).ok())
        .map(|p| Zeroizing::new(p.into_owned().into_bytes()));
    let password = prepared.as_deref().map_or(password, Vec::as_slice);
    let mut salted = Zeroizing::new([0; KEY_LEN]);
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, salted.as_mut_slice());
    salted
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; KEY_LEN] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn xor(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    const PASSWORD: &[u8] = b"correct horse battery staple";

    fn verifier(password: &[u8]) -> ScramVerifier {
        ScramVerifier::from_password(password, b"0123456789abcdef", 4096).expect("valid parameters")
    }

    /// Runs postgres-protocol's client against a ScramServer; returns the three client/server
    /// messages the gateway would relay, and the server's result.
    fn pg_client_exchange(
        password: &[u8],
        verifier: &ScramVerifier,
    ) -> (Vec<u8>, Vec<u8>, Vec<u8>, Result<ClientKey, ScramError>) {
        let mut client = ScramSha256::new(password, ChannelBinding::unsupported());
        let mut server = ScramServer::with_random_nonce(verifier.clone());
        let client_first = client.message().to_vec();
        let server_first = server
            .handle_client_first(&client_first)
            .expect("server-first");
        client
            .update(&server_first)
            .expect("client accepts server-first");
        let client_final = client.message().to_vec();
        let result = server
            .handle_client_final(&client_final)
            .map(|(server_final, key)| {
                client
                    .finish(&server_final)
                    .expect("client accepts server signature");
                key
            });
        (client_first, server_first, client_final, result)
    }

    fn login(client: &mut ScramClient, server: &mut ScramServer) -> Result<ClientKey, ScramError> {
        let client_first = client.client_first();
        let server_first = server.handle_client_first(&client_first)?;
        let client_final = client.handle_server_first(&server_first)?;
        let (server_final, key) = server.handle_client_final(&client_final)?;
        client.handle_server_final(&server_final)?;
        Ok(key)
    }

    #[test]
    fn rfc7677_example() {
        let salt = BASE64
            .decode("W22ZaJ0SNY7soEsUEjb6gQ==")
            .expect("valid base64");
        let verifier = ScramVerifier::from_password(b"pencil", &salt, 4096).expect("verifier");
        let client_first = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let client_final = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        let server_final = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

        let mut server =
            ScramServer::new(verifier.clone(), "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into());
        assert_eq!(
            server.handle_client_first(client_first).unwrap(),
            server_first
        );
        let (sent, key) = server.handle_client_final(client_final).unwrap();
        assert_eq!(sent, server_final);
        assert_eq!(key.stored_key(), *verifier.stored_key());

        let recovered =
            recover_client_key(&verifier, client_first, server_first, client_final).unwrap();
        assert_eq!(recovered.stored_key(), *verifier.stored_key());
    }

    #[test]
    fn client_matches_rfc7677_example_with_empty_user() {
        // libpq sends "n=,": same exchange as RFC 7677 with the user name left out.
        let salt = BASE64
            .decode("W22ZaJ0SNY7soEsUEjb6gQ==")
            .expect("valid base64");
        let verifier = ScramVerifier::from_password(b"pencil", &salt, 4096).expect("verifier");
        let mut client = ScramClient::with_password(b"pencil");
        let mut server =
            ScramServer::new(verifier.clone(), "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into());
        let client_first = client.start("rOprNGfwEbeRWgbNEkqO".into());
        assert_eq!(client_first, b"n,,n=,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = server.handle_client_first(&client_first).unwrap();
        let client_final = client.handle_server_first(&server_first).unwrap();
        assert!(client_final
            .starts_with(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p="));
        let (server_final, _) = server.handle_client_final(&client_final).unwrap();
        client.handle_server_final(&server_final).unwrap();
    }

    #[test]
    fn password_client_round_trip() {
        let verifier = verifier(PASSWORD);
        let mut client = ScramClient::with_password(PASSWORD);
        let mut server = ScramServer::with_random_nonce(verifier.clone());
        let key = login(&mut client, &mut server).unwrap();
        assert_eq!(key.stored_key(), *verifier.stored_key());
        // The exchange is over: further messages are out of order.
        assert!(matches!(
            client.handle_server_final(b"v=x"),
            Err(ScramError::OutOfOrder(_))
        ));
        assert!(matches!(
            server.handle_client_first(b"n,,n=,r=abc"),
            Err(ScramError::OutOfOrder(_))
        ));
    }

    #[test]
    fn wrong_password_is_invalid_proof() {
        let mut client = ScramClient::with_password(b"wrong");
        let mut server = ScramServer::with_random_nonce(verifier(PASSWORD));
        assert_eq!(
            login(&mut client, &mut server).unwrap_err(),
            ScramError::InvalidProof
        );
    }

    #[test]
    fn client_rejects_server_without_verifier() {
        // A server with another password's verifier cannot produce the right signature, even if
        // it accepts the proof; simulate that by answering with a signature from another key.
        let mut client = ScramClient::with_password(PASSWORD);
        let mut server = ScramServer::with_random_nonce(verifier(PASSWORD));
        let server_first = server.handle_client_first(&client.client_first()).unwrap();
        client.handle_server_first(&server_first).unwrap();
        let forged = server_final_message(&[7; KEY_LEN]);
        assert_eq!(
            client.handle_server_final(&forged),
            Err(ScramError::InvalidServerSignature)
        );
    }

    #[test]
    fn postgres_protocol_client_then_relogin_with_client_key() {
        let verifier = verifier(PASSWORD);
        let (_, _, _, key) = pg_client_exchange(PASSWORD, &verifier);
        let key = key.unwrap();

        // Failover: log in to another server that shares the verifier, without the password.
        let mut client = ScramClient::with_client_key(key.clone(), Some(*verifier.server_key()));
        let mut standby = ScramServer::with_random_nonce(verifier.clone());
        login(&mut client, &mut standby).unwrap();

        let mut client = ScramClient::with_client_key(key, None);
        let mut standby = ScramServer::with_random_nonce(verifier);
        login(&mut client, &mut standby).unwrap();
    }

    #[test]
    fn postgres_protocol_client_that_could_bind() {
        // ChannelBinding::unrequested sends "y,,": it could bind, but no PLUS was offered.
        let verifier = verifier(PASSWORD);
        let mut client = ScramSha256::new(PASSWORD, ChannelBinding::unrequested());
        let mut server = ScramServer::with_random_nonce(verifier);
        assert!(client.message().starts_with(b"y,,"));
        let server_first = server.handle_client_first(client.message()).unwrap();
        client.update(&server_first).unwrap();
        assert!(client.message().starts_with(b"c=eSws,"));
        let (server_final, _) = server.handle_client_final(client.message()).unwrap();
        client.finish(&server_final).unwrap();
    }

    #[test]
    fn client_key_without_server_key_still_rejects_errors() {
        let verifier = verifier(PASSWORD);
        let (_, _, _, key) = pg_client_exchange(PASSWORD, &verifier);
        let mut client = ScramClient::with_client_key(key.unwrap(), None);
        let mut server = ScramServer::with_random_nonce(verifier);
        let server_first = server.handle_client_first(&client.client_first()).unwrap();
        client.handle_server_first(&server_first).unwrap();
        assert_eq!(
            client.handle_server_final(b"e=invalid-proof"),
            Err(ScramError::ServerError("invalid-proof".into()))
        );
    }

    #[test]
    fn recover_client_key_from_recorded_exchange() {
        let verifier = verifier(PASSWORD);
        let (client_first, server_first, client_final, key) =
            pg_client_exchange(PASSWORD, &verifier);
        let recovered =
            recover_client_key(&verifier, &client_first, &server_first, &client_final).unwrap();
        assert_eq!(recovered.stored_key(), key.unwrap().stored_key());

        let (client_first, server_first, client_final, key) =
            pg_client_exchange(b"wrong", &verifier);
        assert_eq!(key.unwrap_err(), ScramError::InvalidProof);
        assert_eq!(
            recover_client_key(&verifier, &client_first, &server_first, &client_final).unwrap_err(),
            ScramError::InvalidProof
        );

        // The password changed after the verifier was read.
        let (client_first, server_first, client_final, _) = pg_client_exchange(PASSWORD, &verifier);
        let old = super::tests::verifier(b"old password");
        assert_eq!(
            recover_client_key(&old, &client_first, &server_first, &client_final).unwrap_err(),
            ScramError::InvalidProof
        );
    }

    #[test]
    fn postgres_protocol_verifiers_parse_and_verify() {
        for password in [&b"secret"[..], b"", b"p\xe4ss", "pässwörd".as_bytes()] {
            let secret = postgres_protocol::password::scram_sha_256(password);
            let verifier = ScramVerifier::parse(&secret).unwrap();
            assert_eq!(verifier.iterations(), 4096);
            assert_eq!(verifier.salt().len(), 16);
            let (_, _, _, key) = pg_client_exchange(password, &verifier);
            key.unwrap();
            // Precomposed non-ASCII text is its own SASLprep form, so the password client agrees.
            let mut client = ScramClient::with_password(password);
            login(&mut client, &mut ScramServer::with_random_nonce(verifier)).unwrap();
        }
    }

    #[test]
    fn from_password_matches_parse() {
        let salt = BASE64
            .decode("W22ZaJ0SNY7soEsUEjb6gQ==")
            .expect("valid base64");
        let made = ScramVerifier::from_password(b"pencil", &salt, 4096).unwrap();
        let secret = format!(
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==${}:{}",
            BASE64.encode(made.stored_key()),
            BASE64.encode(made.server_key())
        );
        let parsed = ScramVerifier::parse(&secret).unwrap();
        assert_eq!(parsed.stored_key(), made.stored_key());
        assert_eq!(parsed.server_key(), made.server_key());
        assert_eq!(parsed.salt(), salt.as_slice());
        assert!(ScramVerifier::from_password(b"x", b"salt", 0).is_err());
    }

    #[test]
    fn invalid_verifiers() {
        let good = postgres_protocol::password::scram_sha_256(b"pw");
        ScramVerifier::parse(&good).unwrap();
        let bad = [
            "",
            "md5abcdef",
            "SCRAM-SHA-256$",
            "SCRAM-SHA-256$4096:c2FsdA==",
            "SCRAM-SHA-256$0:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$-1:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:!!$AAAA:AAAA",
            &good.replace("SCRAM-SHA-256", "SCRAM-SHA-1"),
            &good[..good.len() - 4],
            &format!("{good}x"),
        ];
        for secret in bad {
            assert!(
                matches!(
                    ScramVerifier::parse(secret),
                    Err(ScramError::InvalidVerifier(_))
                ),
                "{secret:?}"
            );
        }
    }

    /// Runs an exchange with a server that offers binding to `end_point` (the client
    /// `selected` SCRAM-SHA-256-PLUS or not), the client sending gs2 header `header` and
    /// binding data `data` with a correct proof.
    fn bound_exchange(
        end_point: &[u8],
        selected: bool,
        header: &str,
        data: &[u8],
    ) -> Result<(Vec<u8>, ClientKey), ScramError> {
        let verifier = verifier(PASSWORD);
        let salted = salted_password(PASSWORD, verifier.salt(), verifier.iterations());
        let key = ClientKey::from_salted_password(&salted);
        let mut server = ScramServer::new(verifier, "srv".into())
            .offer_channel_binding(end_point.to_vec(), selected);
        let server_first = server.handle_client_first(format!("{header}n=,r=abc").as_bytes())?;
        let cbind = [header.as_bytes(), data].concat();
        let without_proof = format!("c={},r=abcsrv", BASE64.encode(cbind));
        let auth = auth_message(b"n=,r=abc", &server_first, without_proof.as_bytes());
        let proof = BASE64.encode(key.proof(&auth));
        server.handle_client_final(format!("{without_proof},p={proof}").as_bytes())
    }

    #[test]
    fn server_binds_to_its_certificate() {
        let end_point = Sha256::digest(b"the server's certificate").to_vec();
        let bound = "p=tls-server-end-point,,";
        bound_exchange(&end_point, true, bound, &end_point).unwrap();
        // postgres-protocol's client, binding to the same data, agrees.
        let mut client = ScramSha256::new(
            PASSWORD,
            ChannelBinding::tls_server_end_point(end_point.clone()),
        );
        let mut server = ScramServer::with_random_nonce(verifier(PASSWORD))
            .offer_channel_binding(end_point.clone(), true);
        let server_first = server.handle_client_first(client.message()).unwrap();
        client.update(&server_first).unwrap();
        let (server_final, _) = server.handle_client_final(client.message()).unwrap();
        client.finish(&server_final).unwrap();
        // Another certificate's hash: a TLS connection someone in between made.
        assert_eq!(
            bound_exchange(&end_point, true, bound, &[0; 32]).unwrap_err(),
            ScramError::ChannelBindingMismatch
        );
        assert_eq!(
            bound_exchange(&end_point, true, "p=tls-unique,,", &end_point).unwrap_err(),
            ScramError::ChannelBindingType
        );
        assert!(matches!(
            bound_exchange(&end_point, true, "n,,", b""),
            Err(ScramError::ChannelBindingSelection(_))
        ));
        assert!(matches!(
            bound_exchange(&end_point, false, bound, &end_point),
            Err(ScramError::ChannelBindingSelection(_))
        ));
        // Offered but not chosen: a plain exchange, unless the client says it could have bound
        // but was not offered to (an offer removed on the way).
        bound_exchange(&end_point, false, "n,,", b"").unwrap();
        assert_eq!(
            bound_exchange(&end_point, false, "y,,", b"").unwrap_err(),
            ScramError::ChannelBindingDowngrade
        );
        // A relayed exchange never binds.
        assert_eq!(
            recover_client_key(
                &verifier(PASSWORD),
                b"p=tls-server-end-point,,n=,r=abc",
                b"r=abcsrv,s=c2FsdA==,i=4096",
                b"c=biws,r=abcsrv,p=AAAA"
            )
            .unwrap_err(),
            ScramError::ChannelBindingUnsupported
        );
    }

    #[test]
    fn server_channel_binding_flags() {
        let verifier = verifier(PASSWORD);
        let mut server = ScramServer::with_random_nonce(verifier.clone());
        assert_eq!(
            server.handle_client_first(b"p=tls-server-end-point,,n=,r=abc"),
            Err(ScramError::ChannelBindingUnsupported)
        );

        // "y" is accepted and must be echoed as c=eSws.
        let mut server = ScramServer::new(verifier.clone(), "srv".into());
        server.handle_client_first(b"y,,n=,r=abc").unwrap();
        let wrong_cbind = format!("c=biws,r=abcsrv,p={}", BASE64.encode([0; 32]));
        assert_eq!(
            server
                .handle_client_final(wrong_cbind.as_bytes())
                .unwrap_err(),
            ScramError::ChannelBindingMismatch
        );

        let mut server = ScramServer::new(verifier, "srv".into());
        server.handle_client_first(b"n,,n=,r=abc").unwrap();
        let wrong_nonce = format!("c=biws,r=abcSRV,p={}", BASE64.encode([0; 32]));
        assert_eq!(
            server
                .handle_client_final(wrong_nonce.as_bytes())
                .unwrap_err(),
            ScramError::NonceMismatch
        );
    }

    #[test]
    fn server_rejects_unsupported_features() {
        let verifier = verifier(PASSWORD);
        for (message, error) in [
            (
                &b"n,a=admin,n=,r=abc"[..],
                ScramError::Unsupported("authorization identity"),
            ),
            (
                b"n,,m=ext,n=,r=abc",
                ScramError::Unsupported("mandatory extension"),
            ),
            (b"n,,n=,r=a\x01c", ScramError::Malformed("nonce")),
            (b"n,,n=,r=", ScramError::Malformed("nonce")),
        ] {
            let mut server = ScramServer::with_random_nonce(verifier.clone());
            assert_eq!(server.handle_client_first(message), Err(error));
        }
        // Extensions are ignored as PostgreSQL does; the user name is ignored too.
        let mut server = ScramServer::with_random_nonce(verifier);
        server
            .handle_client_first(b"n,,n=someone,r=abc,x=ext")
            .unwrap();
    }

    #[test]
    fn client_checks_server_nonce_and_iterations() {
        let mut client = ScramClient::with_password(PASSWORD);
        client.start("abc".into());
        assert_eq!(
            client.handle_server_first(b"r=xyzdef,s=c2FsdA==,i=4096"),
            Err(ScramError::NonceMismatch)
        );
        client.start("abc".into());
        assert_eq!(
            client.handle_server_first(b"r=abc,s=c2FsdA==,i=4096"),
            Err(ScramError::NonceMismatch)
        );
        client.start("abc".into());
        assert_eq!(
            client.handle_server_first(b"r=abcdef,s=c2FsdA==,i=4294967295"),
            Err(ScramError::TooManyIterations(u32::MAX))
        );
        let mut fresh = ScramClient::with_password(PASSWORD);
        assert!(matches!(
            fresh.handle_server_first(b"r=abcdef,s=c2FsdA==,i=4096"),
            Err(ScramError::OutOfOrder(_))
        ));
    }

    #[test]
    fn malformed_messages_are_errors() {
        let verifier = verifier(PASSWORD);
        let client_firsts: &[&[u8]] = &[
            b"",
            b"n",
            b"n,",
            b"n,,",
            b"x,,n=,r=abc",
            b"n,x,n=,r=abc",
            b"n,,r=abc",
            b"n,,n=,x=abc",
            b"n,,n=,r=abc,",
            b"n,,n=,r=abc,=x",
            b"\xff\xfe",
        ];
        for message in client_firsts {
            let mut server = ScramServer::with_random_nonce(verifier.clone());
            assert!(server.handle_client_first(message).is_err(), "{message:?}");
        }

        let proof = BASE64.encode([0; 32]);
        let client_finals: Vec<Vec<u8>> = [
            String::new(),
            ",".into(),
            "c=biws".into(),
            "c=biws,r=abcsrv".into(),
            format!("r=abcsrv,c=biws,p={proof}"),
            format!("c=biws,p={proof}"),
            format!("c=biws,r=abcsrv,p={}", BASE64.encode([0; 31])),
            "c=biws,r=abcsrv,p=not base64".into(),
            format!("c=biws,r=abcsrv,p={proof},x=trailing"),
            format!("c=biws,r=abcsrv,p=AAAA,p={proof}"),
            format!("c=biws,r=abcsrv,,p={proof}"),
        ]
        .into_iter()
        .map(String::into_bytes)
        .collect();
        for message in &client_finals {
            let mut server = ScramServer::new(verifier.clone(), "srv".into());
            server.handle_client_first(b"n,,n=,r=abc").unwrap();
            assert!(server.handle_client_final(message).is_err(), "{message:?}");
            assert!(recover_client_key(
                &verifier,
                b"n,,n=,r=abc",
                b"r=abcsrv,s=c2FsdA==,i=4096",
                message
            )
            .is_err());
        }

        let server_firsts: &[&[u8]] = &[
            b"",
            b"r=abcdef",
            b"r=abcdef,s=c2FsdA==",
            b"r=abcdef,s=c2FsdA==,i=",
            b"r=abcdef,s=c2FsdA==,i=0",
            b"r=abcdef,s=c2FsdA==,i=+5",
            b"r=abcdef,s=c2FsdA==,i=99999999999",
            b"r=abcdef,s=!!,i=4096",
            b"r=abcdef,s=c2FsdA==,i=4096,x=y",
            b"s=c2FsdA==,r=abcdef,i=4096",
            b"e=other-error",
        ];
        for message in server_firsts {
            let mut client = ScramClient::with_password(PASSWORD);
            client.start("abc".into());
            assert!(client.handle_server_first(message).is_err(), "{message:?}");
        }

        let server_finals: &[&[u8]] = &[
            b"",
            b"v=",
            b"v=AAAA",
            b"v=!!",
            b"x=AAAA",
            b"e=invalid-proof",
        ];
        for message in server_finals {
            let mut client = ScramClient::with_password(PASSWORD);
            let mut server = ScramServer::with_random_nonce(verifier.clone());
            let server_first = server.handle_client_first(&client.client_first()).unwrap();
            client.handle_server_first(&server_first).unwrap();
            assert!(client.handle_server_final(message).is_err(), "{message:?}");
        }
    }

    #[test]
    fn truncated_and_random_inputs_never_panic() {
        fn prefix(message: &[u8], len: usize) -> &[u8] {
            &message[..len.min(message.len())]
        }
        let verifier = verifier(PASSWORD);
        let (client_first, server_first, client_final, _) = pg_client_exchange(PASSWORD, &verifier);
        for cut in 0..client_final.len() {
            let mut server = ScramServer::new(verifier.clone(), "srv".into());
            let _ = server.handle_client_first(prefix(&client_first, cut));
            let _ = server.handle_client_final(prefix(&client_final, cut));
            let truncated_final = prefix(&client_final, cut);
            assert!(
                recover_client_key(&verifier, &client_first, &server_first, truncated_final)
                    .is_err()
            );
            let _ = recover_client_key(
                &verifier,
                prefix(&client_first, cut),
                prefix(&server_first, cut),
                &client_final,
            );
            let mut client = ScramClient::with_password(PASSWORD);
            client.client_first();
            let _ = client.handle_server_first(prefix(&server_first, cut));
            let _ = client.handle_server_final(prefix(&client_final, cut));
        }

        let alphabet = b"nypcrsive=,AZ09+/\xff";
        for _ in 0..2000 {
            let junk: Vec<u8> = (0..rand::random::<usize>() % 64)
                .map(|_| alphabet[rand::random::<usize>() % alphabet.len()])
                .collect();
            let mut server = ScramServer::new(verifier.clone(), "srv".into());
            let _ = server.handle_client_first(&junk);
            let _ = server.handle_client_final(&junk);
            let _ = recover_client_key(&verifier, &junk, &junk, &junk);
            let mut client = ScramClient::with_password(PASSWORD);
            client.start("abc".into());
            let _ = client.handle_server_first(&junk);
            let _ = client.handle_server_final(&junk);
            let _ = ScramVerifier::parse(&String::from_utf8_lossy(&junk));
        }
    }

    #[test]
    fn debug_output_hides_keys() {
        let verifier = verifier(PASSWORD);
        let (_, _, _, key) = pg_client_exchange(PASSWORD, &verifier);
        assert_eq!(format!("{:?}", key.unwrap()), "ClientKey(..)");
        assert_eq!(
            format!("{verifier:?}"),
            "ScramVerifier { iterations: 4096, .. }"
        );
    }
}
