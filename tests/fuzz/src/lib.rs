//! Shared code of the fuzz targets: the decode round-trip property, and a
//! real server state (sled store in a temporary directory, registered
//! clients in a group, valid request bodies to mutate) driven in process
//! through the server's HTTP adapter (`mls_ds_server::test_support::InProcess`).

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use mls_ds_client::client::{create_config, CIPHERSUITE};
use mls_ds_protocol::auth::{self, AuthToken, SessionAuth, SessionCreated, SignatureAuth};
use mls_ds_protocol::clients::RegisterClient;
use mls_ds_protocol::groups::{CommitBundle, CreateGroup, SendMessage};
use mls_ds_protocol::key_packages::{ClaimedKeyPackage, PublishKeyPackages};
use mls_ds_protocol::queue::Ack;
use mls_ds_protocol::{decode, encode, paths, ClientId, ErrorBody, CONTENT_TYPE};
use mls_ds_server::test_support::InProcess;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::random::OpenMlsRand;
use openmls_traits::signatures::Signer;
use openmls_traits::OpenMlsProvider;

/// Decode `data` as `T`; if it decodes, run `check` on the value, and the
/// value must encode to bytes that decode to an equal value.
pub fn decode_round_trip<T>(data: &[u8], check: impl FnOnce(&T))
where
    T: tls_codec::Deserialize + tls_codec::Serialize + PartialEq + std::fmt::Debug,
{
    let Ok(value) = decode::<T>(data) else {
        return;
    };
    check(&value);
    let bytes = encode(&value).expect("a decoded value encodes");
    let again = decode::<T>(&bytes).expect("an encoded value decodes");
    assert_eq!(again, value);
}

fn wire<T: tls_codec::Serialize>(v: &T) -> Vec<u8> {
    v.tls_serialize_detached().expect("serialize")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One client of the world: keys, local MLS state, a session.
pub struct Member {
    id: ClientId,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
    provider: OpenMlsRustCrypto,
    group: Option<MlsGroup>,
    session: Option<SessionCreated>,
    counter: u64,
}

impl Member {
    fn new(name: &str) -> Member {
        let provider = OpenMlsRustCrypto::default();
        let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).expect("keys");
        signer.store(provider.storage()).expect("store keys");
        Member {
            id: ClientId::new(name).expect("id"),
            credential: CredentialWithKey {
                credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
                signature_key: signer.public().into(),
            },
            signer,
            provider,
            group: None,
            session: None,
            counter: 0,
        }
    }

    fn key_package(&self) -> Vec<u8> {
        let kp = KeyPackage::builder()
            .build(
                CIPHERSUITE,
                &self.provider,
                &self.signer,
                self.credential.clone(),
            )
            .expect("key package");
        wire(&MlsMessageOut::from(kp.key_package().clone()))
    }

    /// Stage a commit (not merged) and return its bundle.
    fn stage(&mut self, adds: Vec<KeyPackage>) -> CommitBundle {
        let (provider, signer) = (&self.provider, &self.signer);
        let group = self.group.as_mut().expect("in a group");
        let builder = if adds.is_empty() {
            group.commit_builder().force_self_update(true)
        } else {
            group.commit_builder().propose_adds(adds)
        };
        let bundle = builder
            .load_psks(provider.storage())
            .expect("psks")
            .create_group_info(true)
            .build(provider.rand(), provider.crypto(), signer, |_| true)
            .expect("build commit")
            .stage_commit(provider)
            .expect("stage commit");
        let (commit, welcome, group_info) = bundle.into_messages();
        CommitBundle {
            commit: wire(&commit).into(),
            welcome: welcome.map(|w| wire(&w).into()),
            group_info: wire(&group_info.expect("group info")).into(),
        }
    }

    /// A signature token for a request.
    fn signature_header(&self, method: &str, path: &str, body: &[u8]) -> String {
        let nonce: [u8; auth::NONCE_LEN] = self.provider.rand().random_array().expect("nonce");
        let ts = now_ms();
        let payload =
            auth::signature_payload(method, path, &auth::body_hash(body), ts, &self.id, &nonce);
        let signature = self.signer.sign(&payload).expect("sign");
        auth::header_value(&AuthToken::Signature(SignatureAuth {
            client_id: self.id.clone(),
            timestamp_ms: ts,
            nonce,
            signature: signature.into(),
        }))
    }

    /// A session token; `counter` overrides the next fresh counter (replays).
    fn session_header(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
        counter: Option<u64>,
    ) -> Option<String> {
        let session = self.session.as_ref()?;
        let counter = counter.unwrap_or_else(|| {
            self.counter += 1;
            self.counter
        });
        let ts = now_ms();
        let payload = auth::session_payload(
            method,
            path,
            &auth::body_hash(body),
            ts,
            &session.session_id,
            counter,
        );
        Some(auth::header_value(&AuthToken::Session(SessionAuth {
            session_id: session.session_id,
            counter,
            timestamp_ms: ts,
            mac: auth::mac(&session.session_key, &payload),
        })))
    }
}

/// A valid request, as a starting point for mutation.
pub struct Seed {
    method: &'static str,
    path: String,
    body: Vec<u8>,
    /// Who sends it (index into the members).
    who: usize,
}

/// A server state on a fresh store, with alice, bob and carol registered
/// (dave is not), a group of alice and bob, sessions for the three, and
/// valid request bodies of every kind.
pub struct World {
    runtime: tokio::runtime::Runtime,
    server: InProcess,
    members: Vec<Member>,
    group_id: Vec<u8>,
    seeds: Vec<Seed>,
    /// Requests served since the world was built.
    pub served: u64,
    /// With `MLS_DS_FUZZ_STATS` set: answers by method, route and status,
    /// printed when the world is dropped (to see how deep inputs get).
    stats: Option<std::collections::BTreeMap<String, u64>>,
    // Dropped last: the store lives in it.
    _dir: tempfile::TempDir,
}

impl World {
    /// Build the world. The store lives on /dev/shm when there is one, so
    /// the flush every write waits for costs no disk time.
    pub fn new() -> World {
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .expect("temporary directory");
        // Long-polls would make an input wait: cap them at 0 ms.
        let server = InProcess::open(
            &dir.path().join("ds"),
            // The per-client and per-address limits would answer most of
            // a long run with 429 before the handlers see it: off.
            &[
                "--max-wait-ms",
                "0",
                "--rate-limit-per-sec",
                "0",
                "--ip-rate-limit-per-min",
                "0",
            ],
        )
        .expect("server");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut world = World {
            runtime,
            server,
            members: ["alice", "bob", "carol", "dave"]
                .into_iter()
                .map(Member::new)
                .collect(),
            group_id: Vec::new(),
            seeds: Vec::new(),
            served: 0,
            stats: std::env::var_os("MLS_DS_FUZZ_STATS").map(|_| Default::default()),
            _dir: dir,
        };
        world.setup();
        world
    }

    /// Send a request; `None` if it is not a well-formed HTTP request.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        authorization: Option<&[u8]>,
        content_type: Option<&[u8]>,
        body: Vec<u8>,
    ) -> Option<(u16, Vec<u8>)> {
        self.served += 1;
        let mut headers: Vec<(&str, &[u8])> = Vec::new();
        if let Some(a) = authorization {
            headers.push((mls_ds_protocol::AUTH_HEADER, a));
        }
        if let Some(c) = content_type {
            headers.push(("content-type", c));
        }
        self.runtime
            .block_on(self.server.handle(method, path, &headers, body))
    }

    fn signed(&mut self, who: usize, method: &str, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
        let header = self.members[who].signature_header(method, path, &body);
        let ct = (!body.is_empty()).then_some(CONTENT_TYPE.as_bytes());
        self.send(method, path, Some(header.as_bytes()), ct, body)
            .expect("a well-formed request")
    }

    fn ok(&mut self, who: usize, method: &str, path: &str, body: Vec<u8>) -> Vec<u8> {
        let (status, reply) = self.signed(who, method, path, body);
        assert!(
            (200..300).contains(&status),
            "setup {method} {path}: {status} {:?}",
            decode::<ErrorBody>(&reply).map(|e| e.text())
        );
        reply
    }

    fn register(&mut self, who: usize) -> Vec<u8> {
        let m = &self.members[who];
        encode(&RegisterClient {
            client_id: m.id.clone(),
            signature_scheme: m.signer.signature_scheme() as u16,
            signature_key: m.signer.public().to_vec().into(),
            invite: None,
            recovery_hash: None,
        })
        .expect("encode")
    }

    fn claim(&mut self, who: usize, of: usize) -> KeyPackage {
        let path = paths::claim_key_package(&self.members[of].id);
        let reply = self.ok(who, "POST", &path, Vec::new());
        let claimed: ClaimedKeyPackage = decode(&reply).expect("claimed");
        let msg = MlsMessageIn::tls_deserialize_exact(claimed.key_package.as_slice())
            .expect("key package message");
        let MlsMessageBodyIn::KeyPackage(kp) = msg.extract() else {
            panic!("not a key package")
        };
        kp.validate(self.members[who].provider.crypto(), ProtocolVersion::Mls10)
            .expect("valid key package")
    }

    fn setup(&mut self) {
        const ALICE: usize = 0;
        const BOB: usize = 1;
        const CAROL: usize = 2;
        const DAVE: usize = 3;
        for who in [ALICE, BOB, CAROL] {
            let body = self.register(who);
            self.ok(who, "POST", paths::CLIENTS, body);
            let kps = (0..4)
                .map(|_| self.members[who].key_package().into())
                .collect();
            let body = encode(&PublishKeyPackages {
                key_packages: kps,
                last_resort: None,
            })
            .expect("encode");
            self.ok(who, "POST", paths::KEY_PACKAGES, body);
            let reply = self.ok(who, "POST", paths::SESSIONS, Vec::new());
            self.members[who].session = Some(decode(&reply).expect("session"));
        }
        // Alice's group, with bob.
        let create = |m: &mut Member| {
            let g = MlsGroup::new(
                &m.provider,
                &m.signer,
                &create_config(),
                m.credential.clone(),
            )
            .expect("group");
            let body = encode(&CreateGroup {
                group_info: wire(
                    &g.export_group_info(m.provider.crypto(), &m.signer, false)
                        .expect("group info"),
                )
                .into(),
                ratchet_tree: wire(&g.export_ratchet_tree()).into(),
                open: true.into(),
            })
            .expect("encode");
            (g, body)
        };
        let (g, body) = create(&mut self.members[ALICE]);
        self.group_id = g.group_id().as_slice().to_vec();
        self.members[ALICE].group = Some(g);
        self.ok(ALICE, "POST", paths::GROUPS, body);
        let kp = self.claim(ALICE, BOB);
        let bundle = self.members[ALICE].stage(vec![kp]);
        let commits = paths::commits(&self.group_id);
        self.ok(ALICE, "POST", &commits, encode(&bundle).expect("encode"));
        let alice = &mut self.members[ALICE];
        let provider = &alice.provider;
        alice
            .group
            .as_mut()
            .expect("group")
            .merge_pending_commit(provider)
            .expect("merge");

        // Valid requests of every kind, not sent: the inputs mutate them.
        let mut seeds = Vec::new();
        let kp = self.claim(ALICE, CAROL);
        let alice = &mut self.members[ALICE];
        for adds in [vec![], vec![kp]] {
            let bundle = alice.stage(adds);
            let provider = &alice.provider;
            alice
                .group
                .as_mut()
                .expect("group")
                .clear_pending_commit(provider.storage())
                .expect("clear");
            seeds.push(Seed {
                method: "POST",
                path: commits.clone(),
                body: encode(&bundle).expect("encode"),
                who: ALICE,
            });
        }
        let (provider, signer) = (&alice.provider, &alice.signer);
        let group = alice.group.as_mut().expect("group");
        let message = group
            .create_message(provider, signer, b"fuzz")
            .expect("message");
        let (proposal, _) = group
            .propose_remove_member(provider, signer, LeafNodeIndex::new(1))
            .expect("proposal");
        let messages = paths::messages(&self.group_id);
        for m in [message, proposal] {
            seeds.push(Seed {
                method: "POST",
                path: messages.clone(),
                body: encode(&SendMessage {
                    message: wire(&m).into(),
                    send_id: None,
                })
                .expect("encode"),
                who: ALICE,
            });
        }
        seeds.push(Seed {
            method: "POST",
            path: paths::KEY_PACKAGES.into(),
            body: encode(&PublishKeyPackages {
                key_packages: vec![alice.key_package().into()],
                last_resort: Some(alice.key_package().into()),
            })
            .expect("encode"),
            who: ALICE,
        });
        let (_, body) = create(&mut self.members[CAROL]);
        seeds.push(Seed {
            method: "POST",
            path: paths::GROUPS.into(),
            body,
            who: CAROL,
        });
        seeds.push(Seed {
            method: "POST",
            path: paths::CLIENTS.into(),
            body: self.register(DAVE),
            who: DAVE,
        });
        seeds.push(Seed {
            method: "POST",
            path: paths::QUEUE_ACK.into(),
            body: encode(&Ack { up_to: 1 }).expect("encode"),
            who: BOB,
        });
        for (method, path, who) in [
            (
                "POST",
                paths::claim_key_package(&self.members[CAROL].id),
                BOB,
            ),
            ("GET", format!("{}?after=0&limit=10", paths::QUEUE), BOB),
            ("GET", paths::group_info(&self.group_id), CAROL),
            ("GET", paths::KEY_PACKAGES.into(), CAROL),
            ("POST", paths::SESSIONS.into(), BOB),
            ("DELETE", paths::client(&self.members[CAROL].id), CAROL),
            ("GET", paths::HEALTHZ.into(), BOB),
        ] {
            seeds.push(Seed {
                method,
                path,
                body: Vec::new(),
                who,
            });
        }
        self.seeds = seeds;
    }

    /// Build the request an input describes, send it, and check the answer.
    pub fn run(&mut self, input: &Input) {
        let seed = &self.seeds[usize::from(input.seed) % self.seeds.len()];
        let (method, mut path, mut body) = (seed.method.to_string(), seed.path.clone(), {
            let mut b = seed.body.clone();
            for e in &input.edits {
                e.apply(&mut b);
            }
            b
        });
        let mut who = seed.who;
        let method = match &input.method {
            MethodChoice::Seed => method,
            MethodChoice::Get => "GET".into(),
            MethodChoice::Post => "POST".into(),
            MethodChoice::Delete => "DELETE".into(),
            MethodChoice::Other(m) => m.clone(),
        };
        match &input.path {
            PathChoice::Seed => {}
            PathChoice::Suffix(s) => path.push_str(s),
            PathChoice::Group(route, gid) => {
                let gid = match gid {
                    GroupChoice::Ours => hex::encode(&self.group_id),
                    GroupChoice::Bytes(b) => hex::encode(b),
                    GroupChoice::Text(t) => t.clone(),
                };
                let route = match route {
                    GroupRoute::Info => "info",
                    GroupRoute::Commits => "commits",
                    GroupRoute::Messages => "messages",
                    GroupRoute::Other(r) => r,
                };
                path = format!("{}/{gid}/{route}", paths::GROUPS);
            }
            PathChoice::Queue(q) => path = format!("{}?{q}", paths::QUEUE),
            PathChoice::Raw(p) => path = p.clone(),
        }
        if let BodyChoice::Raw(b) = &input.body {
            body = b.clone();
        }
        let authorization = match &input.auth {
            AuthChoice::Seed => Some(self.members[who].signature_header(&method, &path, &body)),
            AuthChoice::Signature(w) => {
                who = usize::from(*w) % self.members.len();
                Some(self.members[who].signature_header(&method, &path, &body))
            }
            AuthChoice::Session(w, counter) => {
                who = usize::from(*w) % self.members.len();
                self.members[who].session_header(&method, &path, &body, *counter)
            }
            AuthChoice::None => None,
            AuthChoice::Raw(h) => Some(String::from_utf8_lossy(h).into_owned()),
        };
        let content_type = match &input.content_type {
            None => Some(CONTENT_TYPE.as_bytes().to_vec()),
            Some(c) => Some(c.clone()),
        };
        let Some((status, reply)) = self.send(
            &method,
            &path,
            authorization.as_deref().map(str::as_bytes),
            content_type.as_deref(),
            body,
        ) else {
            return;
        };
        if let Some(stats) = self.stats.as_mut() {
            *stats
                .entry(format!("{method} {} {status}", route_of(&path)))
                .or_default() += 1;
        }
        // Nothing a client sends makes the server fail.
        assert!(status < 500, "{status} for {method} {path}: {reply:?}");
        // Every refusal carries an error body with the matching code (but
        // an answer to HEAD, which carries no body at all).
        if status >= 400 && method != "HEAD" {
            let e = decode::<ErrorBody>(&reply).expect("error responses carry an ErrorBody");
            assert_eq!(e.code.status(), status, "{}", e.text());
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(stats) = &self.stats {
            for (k, n) in stats {
                eprintln!("answers: {n:>7} {k}");
            }
        }
    }
}

/// A path with ids replaced by `{id}` and without its query.
fn route_of(path: &str) -> String {
    let path = path.split('?').next().unwrap_or_default();
    path.split('/')
        .map(|seg| {
            let id = seg.len() > 16 && seg.bytes().all(|b| b.is_ascii_hexdigit());
            let client = ["alice", "bob", "carol", "dave"].contains(&seg);
            if id || client {
                "{id}"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

/// One fuzz input for `handle_request`: a seed request and what to change.
#[derive(Arbitrary, Debug)]
pub struct Input {
    /// Which valid request to start from.
    pub seed: u8,
    /// Byte edits of its body.
    pub edits: Vec<Edit>,
    /// The method.
    pub method: MethodChoice,
    /// The path.
    pub path: PathChoice,
    /// The body (the edited seed, or other bytes).
    pub body: BodyChoice,
    /// The authorization header.
    pub auth: AuthChoice,
    /// The content type (`None`: the API's).
    pub content_type: Option<Vec<u8>>,
}

/// A change to a body.
#[derive(Arbitrary, Debug)]
pub enum Edit {
    /// Flip one bit.
    Flip(u16, u8),
    /// Set one byte.
    Set(u16, u8),
    /// Cut the body.
    Truncate(u16),
    /// Insert a byte.
    Insert(u16, u8),
    /// Remove a range.
    Remove(u16, u8),
    /// Append bytes.
    Append(Vec<u8>),
}

impl Edit {
    fn apply(&self, b: &mut Vec<u8>) {
        let at = |i: u16, len: usize| usize::from(i) % len.max(1);
        match self {
            Edit::Flip(i, bit) if !b.is_empty() => {
                let i = at(*i, b.len());
                b[i] ^= 1 << (bit % 8);
            }
            Edit::Set(i, v) if !b.is_empty() => {
                let i = at(*i, b.len());
                b[i] = *v;
            }
            Edit::Truncate(n) => b.truncate(usize::from(*n)),
            Edit::Insert(i, v) => {
                let i = at(*i, b.len() + 1);
                b.insert(i, *v);
            }
            Edit::Remove(i, n) if !b.is_empty() => {
                let i = at(*i, b.len());
                let end = (i + usize::from(*n)).min(b.len());
                b.drain(i..end);
            }
            Edit::Append(more) => b.extend_from_slice(more),
            _ => {}
        }
    }
}

/// The method.
#[derive(Arbitrary, Debug)]
pub enum MethodChoice {
    /// The seed's.
    Seed,
    /// GET.
    Get,
    /// POST.
    Post,
    /// DELETE.
    Delete,
    /// Anything.
    Other(String),
}

/// The path.
#[derive(Arbitrary, Debug)]
pub enum PathChoice {
    /// The seed's.
    Seed,
    /// The seed's with something appended.
    Suffix(String),
    /// `/v1/groups/{id}/{route}`.
    Group(GroupRoute, GroupChoice),
    /// `/v1/queue?{query}`.
    Queue(String),
    /// Anything.
    Raw(String),
}

/// What follows the group id in a path.
#[derive(Arbitrary, Debug)]
pub enum GroupRoute {
    /// `info`.
    Info,
    /// `commits`.
    Commits,
    /// `messages`.
    Messages,
    /// Anything.
    Other(String),
}

/// A group id in a path.
#[derive(Arbitrary, Debug)]
pub enum GroupChoice {
    /// The world's group.
    Ours,
    /// Hex of arbitrary bytes.
    Bytes(Vec<u8>),
    /// Any text.
    Text(String),
}

/// The body.
#[derive(Arbitrary, Debug)]
pub enum BodyChoice {
    /// The seed's, edited.
    Seed,
    /// Other bytes.
    Raw(Vec<u8>),
}

/// The authorization header.
#[derive(Arbitrary, Debug)]
pub enum AuthChoice {
    /// A valid signature of the seed's sender over the final request.
    Seed,
    /// A valid signature of member `n`.
    Signature(u8),
    /// A session MAC of member `n`, with a fresh or the given counter.
    Session(u8, Option<u64>),
    /// None.
    None,
    /// Arbitrary header bytes.
    Raw(Vec<u8>),
}
