//! TLS for the native front: the certificate picked by SNI, ALPN, and session tickets whose
//! keys every worker of a node shares.
//!
//! Certificates: a table Python swaps whole on reload (exact name, then `*.parent`, then the
//! default), the same rules as verge.http.tls.HostTable.
//!
//! Tickets: rustls seals a resumption ticket with whatever `ProducesTickets` the config holds.
//! Its own `Ticketer` draws a random key per process, and with SO_REUSEPORT a client's next
//! connection usually lands on another worker, which cannot open the ticket. `SharedTickets`
//! uses the node's key ring instead (verge/http/tls_tickets.py: the supervisor generates and
//! rotates 80-byte keys and pushes them to every worker; the first key seals, all of them
//! open), so any worker resumes any other's sessions and a rotated-out key stops resuming.
//!
//! The ticket format is ours, not OpenSSL's (rustls' session state differs anyway): key name
//! (16 bytes, public) || nonce (12) || AES-256-GCM(state) || tag (16). The AEAD key is
//! derived with HKDF-SHA256 from the key's 64 secret bytes rather than used as is, so the
//! same key material never serves two constructions (OpenSSL uses it for AES-CBC + HMAC).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

// ----- certificates: the SNI table ------------------------------------------------------

#[derive(Default)]
pub struct CertTable {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl CertTable {
    fn lookup(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = server_name {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(key) = self.exact.get(&name) {
                return Some(key.clone());
            }
            if let Some((_, parent)) = name.split_once('.') {
                if let Some(key) = self.wildcard.get(parent) {
                    return Some(key.clone());
                }
            }
        }
        self.default.clone()
    }
}

/// The table as the server holds it: new handshakes read it, `set_certs` swaps it.
pub type SharedCerts = Arc<RwLock<Arc<CertTable>>>;

struct Resolver(SharedCerts);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello) -> Option<Arc<CertifiedKey>> {
        let table = self.0.read().unwrap().clone();
        table.lookup(hello.server_name())
    }
}

/// (chain DER list, key DER, OCSP DER or None) from Python.
pub type CertParts = (Vec<Vec<u8>>, Vec<u8>, Option<Vec<u8>>);
/// (hosts, chain, key, OCSP) from Python.
pub type CertEntry = (Vec<String>, Vec<Vec<u8>>, Vec<u8>, Option<Vec<u8>>);

fn certified_key(parts: CertParts) -> PyResult<Arc<CertifiedKey>> {
    let (chain, key, ocsp) = parts;
    if chain.is_empty() {
        return Err(PyValueError::new_err("certificate chain is empty"));
    }
    let signing = rustls::sign::any_supported_type(&rustls::PrivateKey(key))
        .map_err(|_| PyValueError::new_err("unsupported or invalid private key"))?;
    let mut certified = CertifiedKey::new(chain.into_iter().map(rustls::Certificate).collect(), signing);
    certified.ocsp = ocsp.filter(|der| !der.is_empty());
    Ok(Arc::new(certified))
}

/// The first entry naming a host wins.
pub fn build_table(entries: Vec<CertEntry>, default: Option<CertParts>) -> PyResult<CertTable> {
    let mut table = CertTable::default();
    for (hosts, chain, key, ocsp) in entries {
        let certified = certified_key((chain, key, ocsp))?;
        for host in hosts {
            match host.strip_prefix("*.") {
                Some(parent) => table.wildcard.entry(parent.to_owned()).or_insert_with(|| certified.clone()),
                None => table.exact.entry(host).or_insert_with(|| certified.clone()),
            };
        }
    }
    table.default = default.map(certified_key).transpose()?;
    Ok(table)
}

/// The server's TLS configuration: ALPN offers h2 first, then http/1.1 (a client that
/// sends no ALPN gets HTTP/1.1 too).
pub fn server_config(certs: SharedCerts, tickets: Arc<SharedTickets>) -> Arc<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder()
        .with_safe_defaults()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver(certs)));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ticketer = tickets;
    Arc::new(cfg)
}

// ----- session tickets: the node's shared key ring -----------------------------------------

pub const NAME_BYTES: usize = 16;
pub const KEY_BYTES: usize = 80; // name 16 + HMAC key 32 + AES key 32 (tls_tickets.py)
const TAG_BYTES: usize = 16;
/// Ticket lifetime hint: OpenSSL's default session timeout, which the Python listener uses.
/// Key rotation, not this hint, is what ends a ticket's use.
const TICKET_LIFETIME: u32 = 2 * 60 * 60;
const HKDF_SALT: &[u8] = b"verge native session ticket v1";

struct TicketKey {
    name: [u8; NAME_BYTES],
    aead: LessSafeKey,
}

impl TicketKey {
    fn from_bytes(raw: &[u8]) -> Option<Self> {
        if raw.len() != KEY_BYTES {
            return None;
        }
        let mut name = [0u8; NAME_BYTES];
        name.copy_from_slice(&raw[..NAME_BYTES]);
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(&raw[NAME_BYTES..]);
        let info = [&name[..]];
        let aead = LessSafeKey::new(UnboundKey::from(prk.expand(&info, &AES_256_GCM).ok()?));
        Some(TicketKey { name, aead })
    }
}

/// The keys in use: the first seals new tickets, every one opens presented tickets.
#[derive(Default)]
struct KeyRing {
    keys: Vec<Arc<TicketKey>>,
}

pub struct SharedTickets {
    ring: RwLock<KeyRing>,
    rng: SystemRandom,
}

impl SharedTickets {
    /// A ring with one random key: resumption works on this process until Python pushes the
    /// node's keys.
    pub fn new() -> Self {
        let rng = SystemRandom::new();
        let mut raw = [0u8; KEY_BYTES];
        let keys = match rng.fill(&mut raw).ok().and_then(|_| TicketKey::from_bytes(&raw)) {
            Some(key) => vec![Arc::new(key)],
            None => Vec::new(), // no randomness: no tickets (full handshakes) until keys arrive
        };
        SharedTickets { ring: RwLock::new(KeyRing { keys }), rng }
    }

    /// Replace the ring (encrypting key first). Every key must be 80 bytes.
    pub fn set_keys(&self, raw: &[Vec<u8>]) -> PyResult<()> {
        if raw.is_empty() {
            return Err(PyValueError::new_err("at least one ticket key is needed"));
        }
        let keys = raw
            .iter()
            .map(|key| TicketKey::from_bytes(key).map(Arc::new))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| PyValueError::new_err(format!("a ticket key is {KEY_BYTES} bytes")))?;
        self.ring.write().unwrap().keys = keys;
        Ok(())
    }

    /// Names of the keys in use, encrypting key first (for tests and diagnostics).
    pub fn key_names(&self) -> Vec<Vec<u8>> {
        self.ring.read().unwrap().keys.iter().map(|key| key.name.to_vec()).collect()
    }

    fn encrypting(&self) -> Option<Arc<TicketKey>> {
        self.ring.read().unwrap().keys.first().cloned()
    }

    fn by_name(&self, name: &[u8]) -> Option<Arc<TicketKey>> {
        self.ring.read().unwrap().keys.iter().find(|key| key.name[..] == *name).cloned()
    }
}

impl ProducesTickets for SharedTickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        TICKET_LIFETIME
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let key = self.encrypting()?;
        let mut nonce = [0u8; NONCE_LEN]; // random: a counter would link a client's tickets
        self.rng.fill(&mut nonce).ok()?;
        let mut ticket = Vec::with_capacity(NAME_BYTES + NONCE_LEN + plain.len() + TAG_BYTES);
        ticket.extend_from_slice(&key.name);
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(plain);
        let aad = Aad::from(key.name); // the name is bound to the sealed state
        let tag = key
            .aead
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), aad, &mut ticket[NAME_BYTES + NONCE_LEN..])
            .ok()?;
        ticket.extend_from_slice(tag.as_ref());
        Some(ticket)
    }

    /// Attacker-controlled input: every length is checked, failures are None (a full
    /// handshake), never a panic.
    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < NAME_BYTES + NONCE_LEN + TAG_BYTES {
            return None;
        }
        let (name, rest) = ticket.split_at(NAME_BYTES);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let key = self.by_name(name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut out = sealed.to_vec();
        let plain_len = key.aead.open_in_place(nonce, Aad::from(key.name), &mut out).ok()?.len();
        out.truncate(plain_len);
        Some(out)
    }
}
