//! One reconcile of one provider: decide whether a test is due and start it (it runs
//! beside the reconciles, see `inflight`); the test writes the status if it changed (or a
//! heartbeat is due), records an Event when Ready changed, and asks for the reconcile
//! that schedules the next one.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use super::limits::{Write, WriteSlot};
use super::objects::{self, Readiness};
use super::schedule::{self, Memory, Seen, Unwatched};
use super::status::{self, Context as StatusContext};
use super::{Context, FIELD_MANAGER};
use crate::api::{
    CHECK_REQUESTED_AT, Endpoint, IncomingMailProvider, IncomingMailProviderStatus, Reason,
};
use crate::check;
use crate::credentials::references;

/// How long a first test, or that of a changed Secret or ConfigMap, may run before the
/// status says Checking.
const SHOW_CHECKING_AFTER: Duration = Duration::from_secs(2);

/// How long the API server must have refused the watch of a namespace's Secrets or
/// ConfigMaps before its providers say `AccessDenied` (a RoleBinding created with the
/// controller may take a moment); also how often they look again.
const ACCESS_DENIED_AFTER: Duration = Duration::from_secs(15);

/// How long after a failed read or write the provider is reconciled again, at first.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// The longest wait between writes of a status the API server keeps refusing.
const REFUSED_RETRY_CAP: Duration = Duration::from_secs(300);
/// The longest wait between writes of a status that keep failing otherwise (an admission
/// webhook that cannot be reached, an API server answering 500): shorter, since the
/// cause is more often passing.
const FAILED_RETRY_CAP: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading a referenced object: {0}")]
    Fetch(#[source] kube::Error),
    #[error("the caches of Secrets and ConfigMaps have not synced yet")]
    NotSynced,
    #[error("writing status: {0}")]
    WriteStatus(#[source] kube::Error),
    #[error(
        "the provider was deleted (or deleted and created again) before its status was written"
    )]
    Gone,
    #[error("the provider now belongs to another shard, which writes its status")]
    Moved,
}

impl Error {
    /// The provider no longer exists, by the cache's word or the API server's
    /// (see [`confirm_gone`]).
    fn provider_gone(&self) -> bool {
        matches!(self, Error::Gone)
    }

    /// A write answered 404: the provider may be gone (see [`confirm_gone`]).
    fn not_found(&self) -> bool {
        matches!(self, Error::WriteStatus(kube::Error::Api(status)) if status.code == 404)
    }

    /// Gone by the cache's word, or by a 404 the API server confirms.
    async fn gone_for_good(
        &self,
        api: &Api<IncomingMailProvider>,
        p: &IncomingMailProvider,
    ) -> bool {
        self.provider_gone() || (self.not_found() && Box::pin(confirm_gone(api, p)).await)
    }

    /// A status write the API server answered and refused (a policy, a schema, rights),
    /// which the next attempt is likely to meet again; not an outage, a conflict (409) or
    /// throttling (429), after which a write soon is what brings the status back.
    fn write_refused(&self) -> bool {
        matches!(self, Error::WriteStatus(kube::Error::Api(status))
            if (400..500).contains(&status.code) && ![404, 409, 429].contains(&status.code))
    }

    /// A status write that failed other than by a conflict (409), which the next write
    /// resolves: refused, answered 500 (a webhook that cannot be reached), or not answered.
    fn write_failed(&self) -> bool {
        matches!(self, Error::WriteStatus(e)
            if !matches!(e, kube::Error::Api(status) if status.code == 409))
    }
}

/// When to try again after `error`: soon, unless this provider's status writes keep
/// failing; then 5 s doubling with each failure in a row, up to 5 minutes for a status
/// the API server refuses and a minute for one it cannot take now, with ±10% so that
/// providers failing together do not retry together. Each was written again every 5 s,
/// for ever: with a fleet, thousands of writes a minute against an API server already
/// in trouble.
fn retry_after(ctx: &Context, key: &ObjectRef<IncomingMailProvider>, error: &Error) -> Duration {
    if !error.write_failed() {
        return RETRY_AFTER;
    }
    let failures = ctx
        .failed_writes
        .lock()
        .unwrap()
        .get(key)
        .map_or(1, |&n| n.max(1));
    let cap = if error.write_refused() {
        REFUSED_RETRY_CAP
    } else {
        FAILED_RETRY_CAP
    };
    RETRY_AFTER
        .saturating_mul(1 << (failures - 1).min(10))
        .min(cap)
        .mul_f64(0.9 + 0.2 * ctx.jitter.unit())
}

pub async fn reconcile(p: Arc<IncomingMailProvider>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = p.namespace().unwrap_or_default();
    let name = p.name_any();
    let span = info_span!("provider", namespace = %ns, name = %name);
    match reconcile_inner(p, ctx, ns).instrument(span).await {
        // Moved to another shard while this reconcile waited to write: that shard's now,
        // and the watch event of the move reconciles it here once more (to forget it).
        Err(Error::Moved) => Ok(Action::await_change()),
        other => other,
    }
}

async fn reconcile_inner(
    p: Arc<IncomingMailProvider>,
    ctx: Arc<Context>,
    ns: String,
) -> Result<Action, Error> {
    if !ctx.shard.owns(&p) {
        // Another replica's: it tests and writes this one. One that was this replica's
        // until its spec named another token Secret is forgotten, so that its series and
        // its schedule are not kept (and counted) in two replicas.
        let key = ObjectRef::from_obj(&*p);
        // A test of it waiting for a slot leaves; one under way writes nothing (`apply`).
        ctx.inflight.nudge(&key);
        ctx.metrics.provider_ready(&ns, &p.name_any(), None);
        ctx.forget(&key);
        ctx.failed_writes.lock().unwrap().remove(&key);
        return Ok(Action::await_change());
    }
    if gone(&ctx, &p) {
        // Deleted, as the API server said when its status was written; the cache has
        // not heard yet (its watch lags, or cannot watch at all). Testing what the cache
        // holds would find it gone again, at once, in a loop of logins.
        return Ok(Action::await_change());
    }
    if p.being_deleted() {
        // Deleted, held only by someone's finalizer: no more logins, nor a verdict or a
        // metrics series that would keep an alert on it firing (the sweep forgets the
        // rest). A test of it waiting for a slot leaves the line.
        ctx.inflight.nudge(&ObjectRef::from_obj(&*p));
        ctx.metrics.provider_ready(&ns, &p.name_any(), None);
        return Ok(Action::await_change());
    }
    // What its stored status says: a replica that just took over reports the fleet's
    // Ready counts at once, not only as each provider's status is next written.
    let ready = status::ready(p.status.as_ref());
    let ready = ready.map(|c| (c.status.as_str(), c.reason.as_str()));
    ctx.metrics.provider_seen(&ns, &p.name_any(), ready);
    let key = ObjectRef::from_obj(&*p);
    if ctx.inflight.is_running(&key) {
        // When it is done, the test asks for this reconcile again. One still waiting for
        // a slot looks whether its provider was changed, deleted or created again.
        ctx.inflight.nudge(&key);
        return Ok(Action::await_change());
    }
    if behind_own_write(&ctx, &key, &p) {
        // What is decided and built now would start from the status before this
        // replica's last write (a failure not counted, a change announced again). The
        // write's watch event is on its way, and calls this again; the requeue is for a
        // status someone else changed meanwhile.
        return Ok(Action::requeue(Duration::from_millis(250)));
    }
    let api: Api<IncomingMailProvider> = Api::namespaced(ctx.client.clone(), &ns);
    let old = p.status.as_ref();
    let generation = p.meta().generation;
    let request = p.annotations().get(CHECK_REQUESTED_AT).map(String::as_str);
    let now = Timestamp::now();
    let sctx = StatusContext {
        generation,
        now,
        check_request: request,
        new_references: false,
    };
    // A provider waits only for the caches of the kinds it references (none for one that
    // references nothing).
    let refs = references(&p.spec);
    let mut kinds: Vec<_> = refs.iter().map(|r| r.kind).collect();
    kinds.sort();
    kinds.dedup();
    if !kinds.is_empty() && !p.spec.suspend {
        // A stopping controller waits for no cache: graceful shutdown waits for this.
        let ready = tokio::select! {
            ready = tokio::time::timeout(
                Duration::from_secs(30),
                ctx.objects.ready_for(&ns, &kinds, ACCESS_DENIED_AFTER),
            ) => ready,
            _ = ctx.stopping.clone() => return Ok(Action::await_change()),
        };
        match ready {
            Ok(Readiness::Listed) => {}
            Ok(Readiness::Denied(message)) => {
                return Box::pin(access_denied(&api, &p, &key, message, &sctx, &ctx)).await;
            }
            Ok(Readiness::NotListed) | Err(_) => return Err(Error::NotSynced),
        }
    }

    if p.spec.suspend {
        // Resumed, it starts afresh: neither its old schedule nor a result kept from
        // before comes back.
        ctx.forget(&key);
        let new = status::suspended(old, &Endpoint::of(&p.spec), &sctx);
        if status::differs(old, &new) {
            Box::pin(write(&api, &p, &new, &ctx, Write::Change)).await?;
            // Ready changed (to Unknown, Suspended): an Event like every other change.
            Box::pin(announce(&p, old, &new, &ctx)).await;
        }
        return Ok(Action::await_change());
    }

    let (interval, _) = match check::timing(&p.spec) {
        Ok(t) => t,
        Err(message) => {
            // The CRD refuses such durations; an object stored before a rule existed may not.
            let outcome = check::Outcome::before_connecting(&p.spec, Reason::InvalidSpec, message);
            let new = status::after_test(old, &outcome, &sctx);
            if status::untested_news(old, &new) {
                Box::pin(write(&api, &p, &new, &ctx, Write::Change)).await?;
                // A Warning Event like every change of Ready.
                Box::pin(announce(&p, old, &new, &ctx)).await;
            }
            return Ok(Action::await_change());
        }
    };

    let fingerprint = ctx.objects.fingerprint(&ns, &refs).await;
    let memory = remembered(&ctx, &key, &p);
    // Only where `decide` reads it: a provider first seen since this replica started.
    let unwatched = match memory {
        Some(_) => Unwatched::default(),
        None => ctx.objects.unwatched(&ns, &refs),
    };
    let seen = Seen {
        generation,
        request,
        references: fingerprint,
        unwatched,
        status: old,
        interval,
        now,
    };
    let why = match schedule::decide(memory.as_ref(), &seen, &*ctx.jitter) {
        Ok(wait) => {
            Box::pin(write_unwritten(&api, &p, &key, &ctx)).await?;
            // First sight after a restart: adopt the schedule the status implies. Else
            // the test is due when the wait ends: `decide` waits no longer than an
            // interval (a clock stepped back leaves a due time further off).
            let due = after(now, wait);
            ctx.memory
                .lock()
                .unwrap()
                .entry(key)
                .and_modify(|m| m.next_due = m.next_due.min(due))
                .or_insert_with(|| Memory {
                    tested: None,
                    written: None,
                    uid: p.metadata.uid.clone(),
                    generation,
                    request: request.map(str::to_string),
                    references: fingerprint,
                    next_due: due,
                });
            return Ok(Action::requeue(wait));
        }
        Err(why) => why,
    };

    let job = |nudges| Job {
        p: p.clone(),
        key: key.clone(),
        why,
        interval,
        now,
        nudges,
    };
    let started = ctx.inflight.start(key.clone(), |nudges| {
        test_and_write(job(nudges), ctx.clone())
    });
    debug_assert!(
        started,
        "one reconcile per provider at a time, and none while it tests"
    );
    // The test asks for a reconcile when it is done, which schedules the next one.
    Ok(Action::await_change())
}

/// A provider whose Secrets or ConfigMaps the controller may not read is not tested: it
/// says so (Ready False, `AccessDenied`, the API server's words and what to grant), rather
/// than keep its last verdict while nobody tests it. The watch retries; once it is let
/// through, the objects it lists trigger this provider's reconcile, and so does the
/// requeue here. It is due at once then: what it remembers of its schedule is made
/// overdue (after a restart, `schedule::decide` reads the same from the status).
async fn access_denied(
    api: &Api<IncomingMailProvider>,
    p: &IncomingMailProvider,
    key: &ObjectRef<IncomingMailProvider>,
    message: String,
    sctx: &StatusContext<'_>,
    ctx: &Context,
) -> Result<Action, Error> {
    // Not forgotten: a reconcile that read the status before this write reached the cache
    // would adopt the old verdict's schedule, and a test a whole interval later.
    ctx.memory
        .lock()
        .unwrap()
        .entry(key.clone())
        .or_insert_with(|| Memory {
            tested: None,
            written: None,
            uid: p.metadata.uid.clone(),
            generation: p.meta().generation,
            request: None,
            references: 0,
            next_due: sctx.now,
        })
        .next_due = sctx.now;
    let old = p.status.as_ref();
    let outcome = check::Outcome::before_connecting(&p.spec, Reason::AccessDenied, message);
    let new = status::after_test(old, &outcome, sctx);
    if status::untested_news(old, &new) {
        write(api, p, &new, ctx, Write::Change).await?;
        announce(p, old, &new, ctx).await;
    }
    Ok(Action::requeue(ACCESS_DENIED_AFTER))
}

/// What the controller remembers of this very object (schedule, a result not yet
/// written). What it remembers under the name of an object deleted since is forgotten:
/// a provider created again under that name gets its own first test.
fn remembered(
    ctx: &Context,
    key: &ObjectRef<IncomingMailProvider>,
    p: &IncomingMailProvider,
) -> Option<Memory> {
    let mut memory = ctx.memory.lock().unwrap();
    match memory.get(key) {
        Some(m) if m.uid == p.metadata.uid => Some(m.clone()),
        Some(_) => {
            memory.remove(key);
            ctx.unwritten.lock().unwrap().remove(key);
            None
        }
        None => None,
    }
}

/// What a test started by a reconcile needs.
struct Job {
    p: Arc<IncomingMailProvider>,
    key: ObjectRef<IncomingMailProvider>,
    why: schedule::Why,
    interval: Duration,
    now: Timestamp,
    /// Notified when its provider changes (see `InFlight::nudge`).
    nudges: Arc<tokio::sync::Notify>,
}

/// Waits for the slots, runs the test, writes the status and an Event, and remembers
/// when the next test is due. Returns how long to wait before the provider's reconcile:
/// at once, or after a failure a few seconds, as kube-runtime's error policy would.
//
// Thousands of these wait at once (10,000 providers applied together): each must stay
// small while it waits, so the test, the reads and the writes (large state machines) are
// boxed where they start.
async fn test_and_write(job: Job, ctx: Arc<Context>) -> Duration {
    let ns = job.p.namespace().unwrap_or_default();
    let span = info_span!("provider", namespace = %ns, name = %job.p.name_any());
    let key = job.key.clone();
    let job_uid = job.p.metadata.uid.clone();
    match test_and_write_inner(job, &ctx, ns)
        .instrument(span.clone())
        .await
    {
        Ok(()) => Duration::ZERO,
        Err(Error::Moved) => {
            span.in_scope(|| {
                info!("moved to another shard during its test; the result is dropped")
            });
            Duration::ZERO
        }
        Err(error) if error.provider_gone() => {
            span.in_scope(|| info!("deleted during its test; the result is dropped"));
            if let Some(uid) = &job_uid {
                ctx.gone
                    .lock()
                    .unwrap()
                    .insert(uid.clone(), key.namespace.clone().unwrap_or_default());
            }
            Duration::ZERO
        }
        Err(error) => {
            let after = retry_after(&ctx, &key, &error);
            span.in_scope(|| warn!(%error, retry_in = ?after, "will retry"));
            after
        }
    }
}

async fn test_and_write_inner(job: Job, ctx: &Context, ns: String) -> Result<(), Error> {
    let Job { p, now, .. } = &job;
    let api: Api<IncomingMailProvider> = Api::namespaced(ctx.client.clone(), &ns);
    let old = p.status.as_ref();
    let generation = p.meta().generation;
    let request = p.annotations().get(CHECK_REQUESTED_AT).map(String::as_str);
    let sctx = StatusContext {
        generation,
        now: *now,
        check_request: request,
        new_references: job.why == schedule::Why::ReferencesChanged,
    };
    let test = async {
        // Not while paused (the Lease not seen renewed): a standby may be testing.
        tokio::select! {
            () = ctx.unpaused() => {}
            _ = ctx.stopping.clone() => return Ok(None),
        }
        // The host's slot first, then one of all: a test waiting for a busy host (a
        // tarpit, say) must not sit on a slot that a test of another host could use.
        // A controller told to stop starts no more tests: graceful shutdown waits for
        // every test started, and thousands may be queued here.
        let host_slot = ctx.limits.acquire(&p.spec.server.host, &ns);
        let Some(_host) = while_current(host_slot, &job, ctx).await else {
            return Ok(None);
        };
        // Read the Secrets and refresh a token only now, so that these reads and token
        // requests are bounded per host like the tests, however many providers wait.
        // Boxed: what follows is large, and only a test that has its slot needs it.
        let work = async {
            let refs = references(&p.spec);
            // The versions this test reads, for the schedule: a Secret changed while the
            // test waited is tested now, and not once more after it.
            let versions = ctx.objects.versions(&ns, &refs).await;
            let fingerprint = objects::fingerprint(&refs, &versions);
            // Its slot among all tests is taken last, and held until its result is written.
            let test_slot = async || while_current(ctx.tests.acquire(&ns), &job, ctx).await;
            let read_missing = matches!(
                job.why,
                schedule::Why::First | schedule::Why::SpecChanged | schedule::Why::Requested
            );
            let fetched = match ctx.objects.fetch(&ns, &refs, read_missing).await {
                Ok(fetched) => fetched,
                Err(e) => {
                    // Listed and watched but not to be read (a Role without `get`): said,
                    // as a refused watch is, and retried with the backoff of a failed test.
                    let Some(message) = ctx.objects.get_refused(&ns, &e) else {
                        return Err(Error::Fetch(e));
                    };
                    let outcome =
                        check::Outcome::before_connecting(&p.spec, Reason::AccessDenied, message);
                    let Some(slot) = test_slot().await else {
                        return Ok(None);
                    };
                    return Ok(Some((Box::new(outcome), fingerprint, slot)));
                }
            };
            // What the cache had not seen yet counts at the version read.
            let versions = ctx.objects.with_fetched(&ns, &refs, versions, &fetched);
            let fingerprint = objects::fingerprint(&refs, &versions);
            // OAuth2: a fresh access token (refreshed, and the Secret rewritten, if needed).
            let fetched = if job.why == schedule::Why::Requested {
                Box::pin(ctx.tokens.prepare_asked(p, fetched)).await
            } else {
                Box::pin(ctx.tokens.prepare(p, fetched)).await
            };
            // The token Secret as this test used it, where the token manager read or
            // wrote it (see `Fetched::token_source`); the others as read before.
            let fingerprint = match &fetched.token_source {
                Some(read) => {
                    let used = ctx.objects.with_read(&ns, &refs, versions, read).await;
                    objects::fingerprint(&refs, &used)
                }
                None => fingerprint,
            };
            for (result, count) in ctx.tokens.take_answers() {
                ctx.metrics.token_refreshes(result, count);
            }
            let Some(slot) = test_slot().await else {
                return Ok(None);
            };
            let outcome = Box::pin(check::run(&p.spec, &fetched)).await;
            if outcome.reason == Reason::AuthenticationFailed {
                ctx.tokens.rejected(p, &fetched);
            }
            Ok(Some((Box::new(outcome), fingerprint, slot)))
        };
        // A pause stops the test before its result (a login may be cut short); the
        // reconcile that follows starts it again, to wait for the end of the pause. A
        // result already there is kept, and written once the pause ends (see `apply`).
        Box::pin(async {
            tokio::select! {
                outcome = work => outcome,
                () = ctx.paused() => Ok(None),
            }
        })
        .await
    };

    // A new provider shows Checking only if its first test is slow (queued behind others,
    // or a server taking its time): most finish first, which saves a write each. So does
    // the test of a changed Secret or ConfigMap, whose old verdict would otherwise stand
    // meanwhile, for a health check to read as the new value's, and the first test after a
    // suspension, whose "no tests run" would.
    let endpoint = Endpoint::of(&p.spec);
    let checking = if old.is_none_or(|s| s.conditions.is_empty()) {
        Some(status::checking(old, &endpoint, &sctx))
    } else if status::says_suspended(old) {
        Some(status::resuming(old, &endpoint, &sctx))
    } else if job.why == schedule::Why::ReferencesChanged {
        Some(status::checking_again(old, &endpoint, &sctx))
    } else {
        None
    };
    let (outcome, shown) = match &checking {
        Some(checking) => showing_checking(test, &api, p, checking, ctx).await?,
        None => (test.await?, false),
    };
    let Some((outcome, fingerprint, _slot)) = outcome else {
        return Ok(());
    };

    // The test's slot is held until its result is written: when the API server is
    // slower than the mail servers (10,000 first tests on 2 shared cores), tests wait
    // rather than results piling up in memory, and a change waits for at most
    // --concurrency writes. Boxed too: only a finished test needs this.
    Box::pin(record(&job, *outcome, fingerprint, shown, &api, &sctx, ctx)).await
}

/// Waits for `slot` (a host's, or one among all tests) while the test is still the one
/// to run: None once its provider is deleted, created again or changed meanwhile (looked
/// at when a reconcile nudges the test, and once the slot is had), or the controller
/// stops. A test in line behind a host that hangs would otherwise hold back, for as long
/// as the line takes, the test of what its provider says now: a new host, or a fix.
async fn while_current<T>(slot: impl Future<Output = T>, job: &Job, ctx: &Context) -> Option<T> {
    tokio::pin!(slot);
    let current = || still_current(&job.p, ctx.provider(&job.key).as_deref());
    loop {
        tokio::select! {
            got = &mut slot => return current().then_some(got),
            () = job.nudges.notified() => {
                if !current() {
                    return None;
                }
            }
            _ = ctx.stopping.clone() => return None,
        }
    }
}

/// Whether a test that waited for its host's slot is still the one to run: not once its
/// provider is deleted (or deleted and created again under its name), nor when its spec
/// changed meanwhile. A user who deletes a provider pointing at the wrong server expects
/// no more logins there; the reconcile that follows a skipped test decides again.
fn still_current(queued: &IncomingMailProvider, now: Option<&IncomingMailProvider>) -> bool {
    still_there(queued, now)
        && now.is_some_and(|now| now.metadata.generation == queued.metadata.generation)
}

/// Whether `now` (the cache's) is the very object `tested` was: not deleted (nor being
/// deleted), nor deleted and created again under its name.
fn still_there(tested: &IncomingMailProvider, now: Option<&IncomingMailProvider>) -> bool {
    now.is_some_and(|now| now.metadata.uid == tested.metadata.uid && !now.being_deleted())
}

/// Whether a write's 404 means the provider is gone: the API server's own answer for the
/// object (absent, or another uid under its name). A 404 for one that exists (its CRD's
/// status subresource missing for a while, a proxy's answer) is a failed write like any
/// other: the result is kept and the write retried, and the provider is not taken for
/// deleted (it would never be tested again).
async fn confirm_gone(api: &Api<IncomingMailProvider>, p: &IncomingMailProvider) -> bool {
    match api.get_opt(&p.name_any()).await {
        Ok(None) => true,
        Ok(Some(now)) if now.metadata.uid != p.metadata.uid => true,
        Ok(Some(_)) => {
            warn!(
                "the API server answered 404 to a status write of this provider, which exists: kept, and written again later"
            );
            false
        }
        Err(_) => false,
    }
}

/// Said not to exist by the API server (see `Context::gone`).
fn gone(ctx: &Context, p: &IncomingMailProvider) -> bool {
    p.metadata
        .uid
        .as_ref()
        .is_some_and(|uid| ctx.gone.lock().unwrap().contains_key(uid))
}

/// Runs a first test (or one of changed references); if it is still running after
/// `SHOW_CHECKING_AFTER`, writes Checking meanwhile. Checking waits behind results
/// (10,000 providers applied at once all show it), and is not written at all if the test
/// ends while it waits for a slot.
async fn showing_checking<T>(
    test: impl Future<Output = Result<T, Error>>,
    api: &Api<IncomingMailProvider>,
    p: &IncomingMailProvider,
    checking: &IncomingMailProviderStatus,
    ctx: &Context,
) -> Result<(T, bool), Error> {
    tokio::pin!(test);
    if let Ok(outcome) = tokio::time::timeout(SHOW_CHECKING_AFTER, &mut test).await {
        return Ok((outcome?, false));
    }
    let slot = tokio::select! {
        outcome = &mut test => return Ok((outcome?, false)),
        slot = ctx.writes.acquire(Write::Background) => slot,
    };
    // The test goes on while Checking is written. Checking only tells people a test is
    // under way: a refused write of it costs neither the result nor a new login.
    let (shown, outcome) = tokio::join!(Box::pin(apply(api, p, checking, ctx, slot)), test);
    match shown {
        Err(e) if e.gone_for_good(api, p).await => Err(Error::Gone),
        Err(Error::Moved) => Err(Error::Moved),
        Err(e) => {
            tracing::warn!(error = %e, "could not show Checking; the test's result is written next");
            Ok((outcome?, false))
        }
        Ok(()) => Ok((outcome?, true)),
    }
}

/// Writes a test's outcome (status, Event) and remembers when the next test is due.
/// `replaces_checking`: a Checking was written during the test, which the result replaces
/// as a change, whatever it says, not to wait behind the routine writes (other Checkings
/// among them).
async fn record(
    job: &Job,
    outcome: check::Outcome,
    fingerprint: u64,
    replaces_checking: bool,
    api: &Api<IncomingMailProvider>,
    sctx: &StatusContext<'_>,
    ctx: &Context,
) -> Result<(), Error> {
    let Job {
        p,
        key,
        why,
        interval,
        ..
    } = job;
    let (interval, stored) = (*interval, p.status.as_ref());
    let finished = Timestamp::now();
    // Deleted during its test, or deleted and created again under its name: the result
    // is the old object's, and is written nowhere (a status applies by name).
    if !still_there(p, ctx.provider(key).as_deref()) {
        info!("deleted during its test; the result is dropped");
        return Ok(());
    }
    // This result supersedes any an earlier write failed to store, and follows it: the
    // failures it counted go on counting (and the backoff with them) through an outage
    // of the API server.
    let kept = ctx.unwritten.lock().unwrap().remove(key);
    let unstored = kept.map(|kept| kept.status(stored));
    let old = unstored.as_ref().or(stored);
    let seconds = outcome.report.as_ref().map(|r| r.duration.as_secs_f64());
    ctx.metrics.test_finished(
        outcome.endpoint.protocol.as_str(),
        outcome.reason.as_str(),
        seconds,
    );
    let sctx = StatusContext {
        now: finished,
        ..*sctx
    };
    let new = status::after_test(old, &outcome, &sctx);
    // A scheduled test whose verdict stands is routine: at debug, or a fleet of 10,000
    // logs 33 lines a second saying nothing new. What changed, or was asked for, at info.
    let (said, reason) = (why.as_str(), outcome.reason.as_str());
    let duration = new.last_check_duration.as_deref().unwrap_or("");
    if *why == schedule::Why::Scheduled && status::ready(old).is_some_and(|c| c.reason == reason) {
        tracing::debug!(why = said, reason, duration, "tested");
    } else {
        info!(why = said, reason, duration, "tested");
    }

    let since_write = since_last_check(stored, finished);
    let failures = u32::try_from(new.consecutive_failures).unwrap_or(u32::MAX);
    let wait = schedule::next_wait(interval, failures, &*ctx.jitter);
    let written_before = last_written(ctx, key, p);
    let mut next = Memory {
        uid: p.metadata.uid.clone(),
        generation: sctx.generation,
        request: sctx.check_request.map(str::to_string),
        references: fingerprint,
        next_due: after(finished, wait),
        tested: Some(finished),
        written: written_before,
    };
    let what = if status::differs(stored, &new) || replaces_checking {
        Some(Write::Change)
    } else if schedule::heartbeat_due(since_write, interval)
        // The stored lastCheckTime must come after the change: else every restart until
        // the next heartbeat would see the change as new (schedule::decide) and test again.
        || *why == schedule::Why::ReferencesChanged
    {
        Some(Write::Background)
    } else {
        None
    };
    if let Some(what) = what
        && let Err(e) = Box::pin(write(api, p, &new, ctx, what)).await
    {
        let moved = matches!(e, Error::Moved);
        if moved || e.gone_for_good(api, p).await {
            // Deleted, or another shard's now, while it was tested: nothing to keep, nor
            // to retry.
            ctx.memory.lock().unwrap().remove(key);
            return Err(if moved { e } else { Error::Gone });
        }
        // The API server is away (restarting, or its etcd is): keep the result and the
        // schedule it implies, and retry only the write (in the next reconcile), so that
        // an outage costs no mail server a login per retry, nor loses this result.
        ctx.unwritten.lock().unwrap().insert(
            key.clone(),
            Unwritten::of(outcome, &sctx, unstored.map(Box::new)),
        );
        ctx.memory.lock().unwrap().insert(key.clone(), next);
        return Err(e);
    }
    if what.is_some() {
        next.written = Some(schedule::Written::of(&new, tokio::time::Instant::now()));
    }
    Box::pin(announce(p, stored, &new, ctx)).await;
    ctx.memory.lock().unwrap().insert(key.clone(), next);
    Ok(())
}

/// This replica's last write of a test's result for this very object, if it remembers one.
fn last_written(
    ctx: &Context,
    key: &ObjectRef<IncomingMailProvider>,
    p: &IncomingMailProvider,
) -> Option<schedule::Written> {
    let memory = ctx.memory.lock().unwrap();
    memory
        .get(key)
        .filter(|m| m.uid == p.metadata.uid)
        .and_then(|m| m.written)
}

/// Whether the cache's copy of `p` does not show this replica's last status write of it
/// yet (see [`schedule::behind_own_write`]).
fn behind_own_write(
    ctx: &Context,
    key: &ObjectRef<IncomingMailProvider>,
    p: &IncomingMailProvider,
) -> bool {
    let written = last_written(ctx, key, p);
    schedule::behind_own_write(
        written.as_ref(),
        p.status.as_ref(),
        tokio::time::Instant::now(),
    )
}

/// How long ago the stored status's lastCheckTime was written, for the heartbeat. One in
/// the future (written by a replica whose clock runs ahead) counts as long ago: waiting
/// for our clock to catch up would freeze LAST CHECK for the skew and an interval.
fn since_last_check(stored: Option<&IncomingMailProviderStatus>, now: Timestamp) -> Duration {
    stored
        .and_then(|s| s.last_check_time.as_ref())
        .and_then(|t| Duration::try_from(t.0.duration_until(now)).ok())
        .unwrap_or(Duration::MAX)
}

/// A test's result whose status write failed, kept until a write succeeds, with what its
/// status was made of: the generation it tested, the request it answered and whether it
/// tested changed references. A later reconcile (a new spec, a routine test) must not
/// relabel it: counted as the newer generation's, a failure went on counting where the
/// new spec's first should start from one.
#[derive(Clone, Debug)]
pub struct Unwritten {
    outcome: check::Outcome,
    finished: Timestamp,
    generation: Option<i64>,
    check_request: Option<String>,
    new_references: bool,
    /// The status it followed, when that was not stored either (several failed writes in
    /// a row): so the status finally written counts every failure of the outage.
    before: Option<Box<IncomingMailProviderStatus>>,
}

impl Unwritten {
    /// The result of a test whose status `sctx` (with `now` its end) was to make.
    fn of(
        outcome: check::Outcome,
        sctx: &StatusContext<'_>,
        before: Option<Box<IncomingMailProviderStatus>>,
    ) -> Self {
        Self {
            outcome,
            finished: sctx.now,
            generation: sctx.generation,
            check_request: sctx.check_request.map(str::to_string),
            new_references: sctx.new_references,
            before,
        }
    }

    /// The status this result makes, after `stored` or the unstored one it followed.
    fn status(&self, stored: Option<&IncomingMailProviderStatus>) -> IncomingMailProviderStatus {
        let sctx = StatusContext {
            generation: self.generation,
            now: self.finished,
            check_request: self.check_request.as_deref(),
            new_references: self.new_references,
        };
        status::after_test(self.before.as_deref().or(stored), &self.outcome, &sctx)
    }
}

/// Writes the status of a result kept by a failed write, if any. The status is made
/// again from the provider as it is now (the cache may have moved on since), and an
/// Event is recorded as it would have been.
async fn write_unwritten(
    api: &Api<IncomingMailProvider>,
    p: &IncomingMailProvider,
    key: &ObjectRef<IncomingMailProvider>,
    ctx: &Context,
) -> Result<(), Error> {
    let Some(kept) = ctx.unwritten.lock().unwrap().get(key).cloned() else {
        return Ok(());
    };
    let old = p.status.as_ref();
    let new = kept.status(old);
    write(api, p, &new, ctx, Write::Change).await?;
    ctx.unwritten.lock().unwrap().remove(key);
    if let Some(m) = ctx.memory.lock().unwrap().get_mut(key) {
        m.written = Some(schedule::Written::of(&new, tokio::time::Instant::now()));
    }
    info!(
        reason = kept.outcome.reason.as_str(),
        "wrote the status of the last test"
    );
    announce(p, old, &new, ctx).await;
    Ok(())
}

/// `at` plus `wait`, saturating.
fn after(at: Timestamp, wait: Duration) -> Timestamp {
    at.checked_add(SignedDuration::try_from(wait).unwrap_or_default())
        .unwrap_or(at)
}

/// Server-side apply of the whole status, by one field manager: fields mailroom no longer
/// sets are removed, and nobody else's fields are touched.
async fn write(
    api: &Api<IncomingMailProvider>,
    p: &IncomingMailProvider,
    status: &IncomingMailProviderStatus,
    ctx: &Context,
    what: Write,
) -> Result<(), Error> {
    let slot = ctx.writes.acquire(what).await;
    apply(api, p, status, ctx, slot).await
}

/// `write`, in a slot already taken.
async fn apply(
    api: &Api<IncomingMailProvider>,
    p: &IncomingMailProvider,
    status: &IncomingMailProviderStatus,
    ctx: &Context,
    _slot: WriteSlot<'_>,
) -> Result<(), Error> {
    // Not while paused: a standby that took the Lease may have written a newer status.
    ctx.unpaused().await;
    let key = ObjectRef::from_obj(p);
    // The slot may have taken a while: a provider deleted, or deleted and created again
    // under its name, meanwhile would get this status (applied by name), the new one
    // another object's verdict and no first test of its own.
    let current = ctx.provider(&key);
    if !still_there(p, current.as_deref()) {
        return Err(Error::Gone);
    }
    // Its spec now names a token Secret of another shard's (see `shard`): that shard
    // tests it, and this result of the old spec would overwrite the new one's.
    if current.is_some_and(|now| !ctx.shard.owns(&now)) {
        return Err(Error::Moved);
    }
    let patch = json!({
        "apiVersion": IncomingMailProvider::api_version(&()),
        "kind": IncomingMailProvider::kind(&()),
        "status": status,
    });
    let written = async {
        // What `Api::patch_status` sends, without decoding the object the API server
        // sends back: nothing reads it, and decoding it (managedFields and all) took about
        // 4% of the controller's CPU in steady state.
        let mut request = kube::core::Request::new(api.resource_url())
            .patch_subresource(
                "status",
                &p.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .map_err(kube::Error::BuildRequest)?;
        request.extensions_mut().insert("patch_subresource");
        ctx.client.request_text(request).await
    }
    .await
    .map_err(Error::WriteStatus);
    // Failures in a row (see `retry_after`): a success or a conflict ends the row.
    match &written {
        Err(e) if e.write_failed() => {
            let mut failed = ctx.failed_writes.lock().unwrap();
            let n = failed.entry(key).or_default();
            *n = n.saturating_add(1);
        }
        _ => {
            ctx.failed_writes.lock().unwrap().remove(&key);
        }
    }
    written?;
    ctx.metrics.api_write("status");
    if let Some(ready) = status::ready(Some(status)) {
        let ns = p.namespace().unwrap_or_default();
        ctx.metrics
            .provider_ready(&ns, &p.name_any(), Some((&ready.status, &ready.reason)));
    }
    Ok(())
}

/// An Event when Ready's status or reason changed (see `status::worth_an_event`): what
/// `kubectl describe` shows.
async fn announce(
    p: &IncomingMailProvider,
    old: Option<&IncomingMailProviderStatus>,
    new: &IncomingMailProviderStatus,
    ctx: &Context,
) {
    if !status::worth_an_event(old, new) {
        return;
    }
    let Some(after) = status::ready(Some(new)) else {
        return;
    };
    let event = Event {
        // Suspended (Unknown) is the owner's choice, no warning.
        type_: if after.status == "False" {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: after.reason.clone(),
        note: Some(event_note(&after.message)),
        action: "Test".into(),
        secondary: None,
    };
    let _slot = ctx.writes.acquire(Write::Change).await;
    match ctx.recorder.publish(&event, &p.object_ref(&())).await {
        Ok(()) => ctx.metrics.api_write("event"),
        Err(e) => warn!(error = %e, "could not record an Event"),
    }
}

/// The API server refuses an Event whose note is over 1,024 bytes (not characters: a
/// server's words or a certificate's names may be far from ASCII).
const EVENT_NOTE_MAX: usize = 1024;

/// `message` cut to what an Event's note may hold, at a character boundary.
fn event_note(message: &str) -> String {
    if message.len() <= EVENT_NOTE_MAX {
        return message.to_string();
    }
    let mut end = EVENT_NOTE_MAX - '…'.len_utf8();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

pub fn error_policy(p: Arc<IncomingMailProvider>, error: &Error, ctx: Arc<Context>) -> Action {
    let after = retry_after(&ctx, &ObjectRef::from_obj(&*p), error);
    warn!(%error, retry_in = ?after, "will retry");
    Action::requeue(after)
}

#[cfg(test)]
mod tests {
    /// Thousands of tests wait at once for their host's slot (10,000 providers applied
    /// together): each must stay small while it waits. Inline, the test and the writes
    /// made it 19.5 KB; with them boxed, about 2.2 KB.
    #[test]
    fn a_waiting_test_is_small() {
        fn size<F, Fut>(_: F) -> usize
        where
            F: Fn(super::Job, std::sync::Arc<super::Context>) -> Fut,
        {
            std::mem::size_of::<Fut>()
        }
        let bytes = size(super::test_and_write);
        assert!(bytes < 3 * 1024, "a waiting test takes {bytes} bytes");
    }

    #[test]
    fn a_last_check_written_by_a_clock_ahead_leaves_the_heartbeat_due() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let now = k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap();
        let at = |secs: i64| super::IncomingMailProviderStatus {
            last_check_time: Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + secs).unwrap(),
            )),
            ..Default::default()
        };
        let (before, ahead) = (at(-60), at(600));
        let since = |s| super::since_last_check(s, now);
        assert_eq!(since(Some(&before)), std::time::Duration::from_secs(60));
        assert_eq!(since(Some(&ahead)), std::time::Duration::MAX);
        assert_eq!(since(None), std::time::Duration::MAX);
    }

    #[test]
    fn an_event_note_fits_the_api_servers_byte_limit_whatever_the_script() {
        for message in ["a".repeat(5000), "é".repeat(1000), "日本".repeat(400)] {
            let note = super::event_note(&message);
            assert!(note.len() <= super::EVENT_NOTE_MAX, "{} bytes", note.len());
            assert!(note.ends_with('…'));
            let kept = note.trim_end_matches('…');
            assert!(message.starts_with(kept) && kept.len() > 1000);
        }
        assert_eq!(super::event_note("short"), "short");
    }

    /// A test that found the port closed.
    fn refused() -> crate::check::Outcome {
        use crate::api::{Endpoint, Protocol, Reason, TlsMode};
        crate::check::Outcome {
            endpoint: Endpoint {
                host: "mail.example".into(),
                port: 993,
                protocol: Protocol::Imap,
                tls_mode: TlsMode::Implicit,
            },
            report: None,
            reason: Reason::ConnectionRefused,
            message: "refused".into(),
            anonymous: false,
        }
    }

    /// A moment, `s` seconds after an arbitrary start.
    fn at(s: i64) -> k8s_openapi::jiff::Timestamp {
        k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    /// Results kept through an outage of the API server, one after another: the status
    /// finally written counts every failure, and schedules the backoff from that count.
    #[test]
    fn results_kept_through_an_outage_go_on_counting_failures() {
        let refused = refused();
        let sctx = super::StatusContext {
            generation: Some(1),
            now: at(0),
            check_request: None,
            new_references: false,
        };
        // Stored before the outage: one failure.
        let stored = super::status::after_test(None, &refused, &sctx);
        assert_eq!(stored.consecutive_failures, 1);
        // Two more tests fail while no write gets through; each follows the one before.
        let ended = |s: i64| super::StatusContext { now: at(s), ..sctx };
        let first = super::Unwritten::of(refused.clone(), &ended(10), None);
        let second = super::Unwritten::of(
            refused.clone(),
            &ended(30),
            Some(Box::new(first.status(Some(&stored)))),
        );
        let written = second.status(Some(&stored));
        assert_eq!(written.consecutive_failures, 3);
        assert_eq!(
            written.last_check_time.as_ref().map(|t| t.0),
            Some(at(30)),
            "the status says when the last test ran"
        );
    }

    /// A result kept through an outage is written as the test made it, whatever the
    /// provider has become meanwhile: the next test, of an edited spec, then counts its
    /// failure from one.
    #[test]
    fn a_kept_result_keeps_the_generation_it_tested() {
        let refused = refused();
        let tested = super::StatusContext {
            generation: Some(1),
            now: at(10),
            check_request: Some("asked"),
            new_references: false,
        };
        let kept = super::Unwritten::of(refused.clone(), &tested, None);
        // The spec edited meanwhile (generation 2): the kept result still says 1.
        let unstored = kept.status(None);
        assert_eq!(unstored.observed_generation, Some(1));
        assert_eq!(
            unstored.last_handled_check_request.as_deref(),
            Some("asked")
        );
        let edited = super::StatusContext {
            generation: Some(2),
            now: at(40),
            check_request: Some("asked"),
            new_references: false,
        };
        let next = super::status::after_test(Some(&unstored), &refused, &edited);
        assert_eq!(next.consecutive_failures, 1, "the new spec's first failure");
    }

    #[test]
    fn a_queued_test_runs_only_for_the_provider_it_was_started_for() {
        use crate::api::IncomingMailProvider;
        let provider = |uid: &str, generation: i64| {
            let mut p: IncomingMailProvider = serde_json::from_value(serde_json::json!({
                "apiVersion": "mailroom.dev/v1alpha1",
                "kind": "IncomingMailProvider",
                "metadata": {"name": "p", "namespace": "ns"},
                "spec": {
                    "server": {"host": "mail.example", "protocol": "IMAP"},
                    "authentication": {"method": "None"},
                },
            }))
            .unwrap();
            p.metadata.uid = Some(uid.into());
            p.metadata.generation = Some(generation);
            p
        };
        let queued = provider("u1", 1);
        assert!(super::still_current(&queued, Some(&provider("u1", 1))));
        assert!(!super::still_current(&queued, None), "deleted");
        assert!(
            !super::still_current(&queued, Some(&provider("u2", 1))),
            "deleted and created again"
        );
        assert!(
            !super::still_current(&queued, Some(&provider("u1", 2))),
            "spec changed"
        );
        // A status write or a new annotation changes neither: the test runs.
        let mut annotated = provider("u1", 1);
        annotated.metadata.resource_version = Some("99".into());
        assert!(super::still_current(&queued, Some(&annotated)));
    }
}
