//! Putting a helper into its own transient systemd scope, `vmd-<name>.scope` in machine.slice,
//! before it runs any guest code (DESIGN.md, "Launch protocol" step 4).

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use zbus::export::futures_core::Stream;
use zbus::{Connection, OwnedObjectPath, OwnedVariant, Variant};
use zbus_systemd::systemd1::ManagerProxy;

/// Room for the VMM itself, its page tables and the kernel's per-process memory on top of the
/// guest's RAM, in the scope's MemoryMax.
pub const MEMORY_OVERHEAD_BYTES: u64 = 128 << 20;
/// Tasks beyond one thread per vCPU: the VMM thread and some slack.
pub const TASKS_OVERHEAD: u64 = 16;
/// The scope's CPUWeight: systemd's default (see `Scopes::start`).
const CPU_WEIGHT: u64 = 100;
/// How long systemd may take to create the scope.
const JOB_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a previous scope of the same name may take to be collected.
const UNIT_GONE_TIMEOUT: Duration = Duration::from_secs(5);

fn clone_properties(
    properties: &[(String, OwnedVariant)],
) -> Result<Vec<(String, OwnedVariant)>, ScopeError> {
    properties
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.try_clone().map_err(ScopeError::Bus)?)))
        .collect()
}

/// Errors from creating a scope.
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error("cannot reach systemd")]
    Bus(#[source] zbus::Error),
    #[error("systemd refused to create {unit}")]
    Start {
        unit: String,
        #[source]
        source: zbus::Error,
    },
    #[error("systemd's job for {unit} ended with {result:?}")]
    JobFailed { unit: String, result: String },
    #[error("systemd did not finish creating {unit} within {JOB_TIMEOUT:?}")]
    Timeout { unit: String },
    #[error("systemd refused to stop the stale {unit}")]
    Stop {
        unit: String,
        #[source]
        source: zbus::Error,
    },
    #[error("systemd did not finish stopping the stale {unit} within {JOB_TIMEOUT:?}")]
    StopTimeout { unit: String },
}

/// The scope's unit name for a VM (VM names need no escaping: DESIGN.md's name rule only
/// allows characters that are valid in unit names).
pub fn unit_name(vm_name: &str) -> String {
    format!("vmd-{vm_name}.scope")
}

/// What goes into the scope.
pub struct ScopeRequest<'a> {
    pub vm_name: &'a str,
    pub pid: u32,
    pub memory_bytes: u64,
    pub vcpus: u32,
}

/// Creates and stops VM scopes through systemd, and follows the jobs that does through one
/// JobRemoved subscription for the whole daemon.
///
/// One subscription, not one per start: every JobRemoved signal would otherwise be queued on
/// (and deserialised by) every start in progress, and zbus's reader waits until each of those
/// queues has room, so with many VMs starting at once every message on the daemon's connection
/// waited for the slowest of them. A subscription also costs a GetNameOwner round trip each.
pub struct Scopes {
    systemd: ManagerProxy<'static>,
    jobs: Arc<Mutex<JobTable>>,
}

/// The jobs the daemon waits for, as the JobRemoved signals end them.
#[derive(Default)]
struct JobTable {
    /// Jobs with a waiter, by job object path.
    waiting: HashMap<String, oneshot::Sender<String>>,
    /// Results of ended jobs nobody waited for when they ended, kept while a job request is
    /// on its way: systemd may end a job before its requester has read the reply naming it.
    unclaimed: HashMap<String, String>,
    /// Job requests sent whose reply (the job's path) has not been read yet.
    requests_in_flight: usize,
    /// The subscription ended (the bus connection closed): no job's end will be seen.
    closed: bool,
}

impl JobTable {
    fn job_removed(&mut self, job: &str, result: String) {
        match self.waiting.remove(job) {
            // A waiter that gave up (its timeout passed) has dropped its receiver: nothing to do.
            Some(waiter) => {
                let _ = waiter.send(result);
            }
            None if self.requests_in_flight > 0 => {
                self.unclaimed.insert(job.to_string(), result);
            }
            // Someone else's job (a unit started by another client or by systemd itself).
            None => {}
        }
    }
}

/// A job request on its way: while one is, ended jobs are kept for their requester.
struct JobRequest {
    jobs: Arc<Mutex<JobTable>>,
}

impl JobRequest {
    fn new(jobs: &Arc<Mutex<JobTable>>) -> JobRequest {
        lock(jobs).requests_in_flight += 1;
        JobRequest { jobs: jobs.clone() }
    }

    /// The job the request was answered with: its result, once it has ended (`None` if the
    /// subscription ended first).
    fn job(self, job: &OwnedObjectPath) -> oneshot::Receiver<String> {
        let (sender, receiver) = oneshot::channel();
        let mut jobs = lock(&self.jobs);
        if let Some(result) = jobs.unclaimed.remove(job.as_str()) {
            let _ = sender.send(result);
        } else if !jobs.closed {
            jobs.waiting.insert(job.to_string(), sender);
        }
        receiver
    }
}

impl Drop for JobRequest {
    fn drop(&mut self) {
        let mut jobs = lock(&self.jobs);
        jobs.requests_in_flight -= 1;
        // Every requester has its job now: results nobody claimed are nobody's.
        if jobs.requests_in_flight == 0 {
            jobs.unclaimed.clear();
        }
    }
}

fn lock(jobs: &Mutex<JobTable>) -> MutexGuard<'_, JobTable> {
    // The table stays consistent at every step: a panic elsewhere cannot have broken it.
    jobs.lock().unwrap_or_else(|e| e.into_inner())
}

impl Scopes {
    /// Subscribes to systemd's job signals on `bus` (JobRemoved is only sent to subscribers)
    /// and starts following them.
    pub async fn follow(bus: &Connection) -> Result<Scopes, ScopeError> {
        let systemd = ManagerProxy::new(bus).await.map_err(ScopeError::Bus)?;
        // Our match rule first, so that no job ends unseen once systemd sends the signals.
        let mut removed = systemd
            .receive_job_removed()
            .await
            .map_err(ScopeError::Bus)?;
        systemd.subscribe().await.map_err(ScopeError::Bus)?;
        let jobs = Arc::new(Mutex::new(JobTable::default()));
        let table = jobs.clone();
        // Never waits on anything but the stream, so the connection's reader never waits on
        // this queue for long.
        tokio::spawn(async move {
            while let Some(signal) = next(&mut removed).await {
                if let Ok(args) = signal.args() {
                    lock(&table).job_removed(args.job.as_str(), args.result.clone());
                }
            }
            let mut jobs = lock(&table);
            jobs.closed = true;
            // Dropping the senders tells every waiter.
            jobs.waiting.clear();
        });
        Ok(Scopes { systemd, jobs })
    }

    /// Runs a job request (`request` answers with the job's path) and waits for the job's end:
    /// `Ok(Err(..))` if systemd refused the request, `Ok(Ok(None))` if the job's end was not
    /// seen within `JOB_TIMEOUT`.
    async fn run_job(
        &self,
        request: impl Future<Output = zbus::Result<OwnedObjectPath>>,
    ) -> zbus::Result<Option<String>> {
        let pending = JobRequest::new(&self.jobs);
        let job = request.await?;
        let ended = pending.job(&job);
        Ok(tokio::time::timeout(JOB_TIMEOUT, ended)
            .await
            .ok()
            .and_then(Result::ok))
    }

    /// Creates the scope and waits until systemd has moved `pid` into it.
    pub async fn start(&self, request: &ScopeRequest<'_>) -> Result<String, ScopeError> {
        let unit = unit_name(request.vm_name);
        let variant = |v: Variant<'_>| OwnedVariant::try_from(v).map_err(ScopeError::Bus);
        let properties = vec![
            (
                "PIDs".to_string(),
                variant(Variant::from(vec![request.pid]))?,
            ),
            (
                "Slice".to_string(),
                variant(Variant::from("machine.slice"))?,
            ),
            (
                "Description".to_string(),
                variant(Variant::from(format!(
                    "vmd virtual machine {}",
                    request.vm_name
                )))?,
            ),
            (
                "CollectMode".to_string(),
                variant(Variant::from("inactive-or-failed"))?,
            ),
            (
                "MemoryMax".to_string(),
                variant(Variant::from(request.memory_bytes + MEMORY_OVERHEAD_BYTES))?,
            ),
            (
                "TasksMax".to_string(),
                variant(Variant::from(u64::from(request.vcpus) + TASKS_OVERHEAD))?,
            ),
            // The helper opens no device after it starts: everything arrives as an fd.
            (
                "DevicePolicy".to_string(),
                variant(Variant::from("strict"))?,
            ),
            // The default weight, set so that systemd puts the scope (and so machine.slice
            // and its siblings) under CPU control wherever it does not already: the VMs then
            // share the CPU with the host's services as one slice, instead of every busy vCPU
            // thread weighing as much as systemd, the bus daemon, machined or vmd, which many
            // spinning guests would otherwise starve (and every VM start waits on them).
            ("CPUWeight".to_string(), variant(Variant::from(CPU_WEIGHT))?),
        ];
        // The VM runs no helper now, so a scope of the same name is stale: a previous helper's
        // on its way out (systemd collects it asynchronously), or one that stayed (its helper
        // died before systemd moved it in, or a daemon died while starting it). It is stopped,
        // once, and given a moment to go.
        let deadline = tokio::time::Instant::now() + UNIT_GONE_TIMEOUT;
        let mut stopped_stale = false;
        let ended = loop {
            let started = self
                .run_job(self.systemd.start_transient_unit(
                    unit.clone(),
                    "fail".to_string(),
                    clone_properties(&properties)?,
                    Vec::new(),
                ))
                .await;
            match started {
                Err(zbus::Error::MethodError(name, _, _))
                    if name.as_str() == "org.freedesktop.systemd1.UnitExists"
                        && tokio::time::Instant::now() < deadline =>
                {
                    if !stopped_stale {
                        stopped_stale = true;
                        tracing::warn!("{unit} outlived its helper; stopping it");
                        self.stop(request.vm_name).await?;
                    } else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                other => {
                    break other.map_err(|source| ScopeError::Start {
                        unit: unit.clone(),
                        source,
                    })?;
                }
            }
        };
        match ended {
            Some(result) if result == "done" => Ok(unit),
            Some(result) => Err(ScopeError::JobFailed { unit, result }),
            None => Err(ScopeError::Timeout { unit }),
        }
    }

    /// Stops VM `vm_name`'s scope if there is one, and waits (bounded) until systemd has
    /// stopped it; it is then collected (CollectMode=inactive-or-failed).
    pub async fn stop(&self, vm_name: &str) -> Result<(), ScopeError> {
        let unit = unit_name(vm_name);
        let stopped = self
            .run_job(self.systemd.stop_unit(unit.clone(), "replace".to_string()))
            .await;
        match stopped {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(ScopeError::StopTimeout { unit }),
            Err(zbus::Error::MethodError(name, _, _))
                if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
            {
                Ok(())
            }
            Err(source) => Err(ScopeError::Stop { unit, source }),
        }
    }
}

/// The next item of a stream, without pulling in a futures crate.
async fn next<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(job: u32) -> OwnedObjectPath {
        OwnedObjectPath::try_from(format!("/org/freedesktop/systemd1/job/{job}")).expect("path")
    }

    #[test]
    fn a_job_that_ends_before_its_reply_is_read_reaches_its_requester() {
        let jobs = Arc::new(Mutex::new(JobTable::default()));
        let request = JobRequest::new(&jobs);
        lock(&jobs).job_removed(path(7).as_str(), "done".into());
        let mut ended = request.job(&path(7));
        assert_eq!(ended.try_recv().ok().as_deref(), Some("done"));
        assert!(lock(&jobs).unclaimed.is_empty());
    }

    #[test]
    fn a_job_that_ends_later_reaches_its_waiter_and_others_are_left_alone() {
        let jobs = Arc::new(Mutex::new(JobTable::default()));
        let mut first = JobRequest::new(&jobs).job(&path(1));
        let mut second = JobRequest::new(&jobs).job(&path(2));
        lock(&jobs).job_removed(path(2).as_str(), "failed".into());
        lock(&jobs).job_removed(path(1).as_str(), "done".into());
        assert_eq!(first.try_recv().ok().as_deref(), Some("done"));
        assert_eq!(second.try_recv().ok().as_deref(), Some("failed"));
        assert!(lock(&jobs).waiting.is_empty());
    }

    #[test]
    fn ends_of_jobs_nobody_asked_for_are_not_kept() {
        let jobs = Arc::new(Mutex::new(JobTable::default()));
        // No request on its way: dropped at once.
        lock(&jobs).job_removed(path(3).as_str(), "done".into());
        assert!(lock(&jobs).unclaimed.is_empty());
        // Kept while one is, then dropped once every requester has its job.
        let request = JobRequest::new(&jobs);
        lock(&jobs).job_removed(path(4).as_str(), "done".into());
        assert_eq!(lock(&jobs).unclaimed.len(), 1);
        let _ended = request.job(&path(5));
        assert!(lock(&jobs).unclaimed.is_empty());
        assert_eq!(lock(&jobs).requests_in_flight, 0);
    }

    #[test]
    fn a_closed_subscription_ends_every_wait() {
        let jobs = Arc::new(Mutex::new(JobTable::default()));
        let request = JobRequest::new(&jobs);
        lock(&jobs).closed = true;
        let mut ended = request.job(&path(6));
        assert!(matches!(
            ended.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
    }
}
