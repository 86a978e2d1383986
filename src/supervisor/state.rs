//! A plugin's state files: carrying its runtime.json into state.json, and writing state.json
//! when what the plugin reads from it changed.
//!
//! These are [`Core`] methods taking the plugin they work on: the entry points look the plugin
//! up once (`Supervisor::split`) and lend it here together with the host that does the I/O.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::host::Durability;
use super::job::AttemptError;
use super::plugin::{Plugin, Written};
use super::{Core, Ctx, MAX_RUNTIME_BYTES};
use crate::protocol::{Event, EventKind};
use crate::state_file::{self, StateError};

/// When the fsyncs that make a state file durable happen. Every write is whole and renamed
/// into place before it returns, so a crash of the daemon at any point leaves the previous file
/// or the new one, whole; the deferred fsyncs only matter for a power loss (hotreloadd(8)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DirSync {
    /// Before the write returns.
    Now,
    /// At the end of the loop turn: after the spawn that reads the file (file and directory).
    EndOfTurn,
    /// Once the reload waiting for the old instance's stop has moved on (it spawned).
    AfterStop,
}

/// Something went wrong with the plugin's state files: said on the event stream as
/// `state_warning` (the caller logs it, in its own words).
pub(super) fn emit_state_warning(ctx: &mut Ctx<'_>, id: &str, error: String, path: &Path) {
    ctx.emit(Event::plugin(
        id,
        EventKind::StateWarning {
            error,
            path: path.to_string_lossy().into_owned(),
        },
    ));
}

impl Core {
    pub(super) fn state_path(&self, id: &str) -> PathBuf {
        self.state_dir.join(id).join("state.json")
    }

    pub(super) fn runtime_path(&self, id: &str) -> PathBuf {
        self.state_dir.join(id).join("runtime.json")
    }

    /// Carry runtime.json into state.json before a start; without preserve_state, start afresh:
    /// runtime.json removed, state.json rewritten with `runtime_data: null` (SPEC §4). Either
    /// way state.json is written, which creates the plugin's state dir for its runtime.json.
    pub(super) fn prepare_state(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &mut Plugin,
        version: &str,
    ) -> Result<(), AttemptError> {
        if ctx.config.hot_reload.preserve_state {
            // Read already when the last instance was reaped, in this same turn as a rule.
            if !std::mem::take(&mut p.runtime_read_after_exit) {
                self.fold_runtime(ctx, p);
            }
        } else {
            self.forget_runtime(ctx, p);
        }
        // A full or read-only state dir must not keep the plugin down (it would end `failed`):
        // it starts with state.json as it was (intact, atomic writes), runtime_data stays in
        // memory and runtime.json on disk, and the next write that works saves them.
        // The directory fsync that makes the rename durable waits until the new instance runs
        // (`sync_state_dirs`): the content itself is on disk before the rename.
        if let Err(e) = self.write_state_file(p, version, "starting", DirSync::EndOfTurn) {
            let id = &p.id;
            let path = self.state_path(id);
            log::warn!("[{id}] cannot write state file, starting with the one on disk: {e}");
            emit_state_warning(ctx, id, format!("cannot write state file: {e}"), &path);
        }
        Ok(())
    }

    /// preserve_state = false: nothing the plugin saved reaches its next instance. A runtime.json
    /// that cannot be removed (read-only state dir) is reported, and does not keep the plugin
    /// down: the daemon never reads it back in this mode.
    fn forget_runtime(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin) {
        let id = &p.id;
        let path = self.runtime_path(id);
        if let Err(e) = self.host.remove_runtime(&path) {
            // `e` names the file.
            let error = e.to_string();
            log::warn!("[{id}] {error}");
            emit_state_warning(ctx, id, error, &path);
        }
        p.runtime_data = Value::Null;
    }

    /// Read runtime.json into runtime_data; an invalid file keeps the previous value (warned).
    pub(super) fn fold_runtime(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin) {
        let id = p.id.as_str();
        let path = self.runtime_path(id);
        match self.host.read_runtime(&path, MAX_RUNTIME_BYTES) {
            state_file::RuntimeRead::Missing => {
                // Only worth saying when there was data to lose: it is kept (SPEC §4).
                if !p.runtime_data.is_null() {
                    let reason = format!(
                        "{} is missing; keeping the previous runtime_data",
                        path.display()
                    );
                    log::warn!("[{id}] {reason}");
                    emit_state_warning(ctx, id, reason, &path);
                }
            }
            state_file::RuntimeRead::Valid(v) => p.runtime_data = v,
            state_file::RuntimeRead::Invalid(reason) => {
                log::warn!("[{id}] keeping the previous runtime_data: {reason}");
                emit_state_warning(ctx, id, reason, &path);
            }
        }
    }

    /// Write state.json when what a plugin reads from it (version, configuration, runtime_data)
    /// differs from what is on disk. `status` and `last_activity` alone are not worth a durable
    /// write: with one fsync'd write per start, a reload's critical path and a 1000-plugin start
    /// stay short.
    pub(super) fn write_state(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &mut Plugin,
        version: &str,
        status: &str,
    ) -> Result<(), String> {
        self.write_state_with(ctx, p, version, status, DirSync::Now)
    }

    pub(super) fn write_state_with(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &mut Plugin,
        version: &str,
        status: &str,
        dir_sync: DirSync,
    ) -> Result<(), String> {
        // Without preserve_state only a start writes the file (`prepare_state`): what a plugin
        // saved is never carried into it.
        if !ctx.config.hot_reload.preserve_state {
            return Ok(());
        }
        self.write_state_file(p, version, status, dir_sync)
    }

    /// Write state.json (see [`Core::write_state`]), whatever preserve_state says.
    pub(super) fn write_state_file(
        &mut self,
        p: &mut Plugin,
        version: &str,
        status: &str,
        dir_sync: DirSync,
    ) -> Result<(), String> {
        let path = self.state_path(&p.id);
        let content = Written {
            version: version.to_string(),
            configuration: p.settings.config.clone(),
            runtime_data: p.runtime_data.clone(),
            control: p.control_record(),
        };
        if p.written.as_ref() == Some(&content) {
            return Ok(());
        }
        let state = state_file::PluginState {
            plugin_id: p.id.clone(),
            configuration: content.configuration.clone(),
            runtime_data: content.runtime_data.clone(),
            last_activity: self.host.wall(),
            version: content.version.clone(),
            status: status.to_string(),
            control: content.control.clone(),
        };
        let durability = match dir_sync {
            DirSync::Now => Durability::Synced,
            DirSync::EndOfTurn | DirSync::AfterStop => Durability::Deferred,
        };
        self.host
            .write_state(&path, &state, durability)
            .map_err(|e| e.to_string())?;
        match dir_sync {
            DirSync::Now => {}
            DirSync::EndOfTurn => self.dir_syncs.push((p.id.clone(), path)),
            DirSync::AfterStop => self.dir_syncs_after_stop.push((p.id.clone(), path)),
        }
        p.written = Some(content);
        Ok(())
    }

    /// The previous run's runtime_data (and what its state.json holds), so state survives a
    /// daemon restart too.
    pub(super) fn load_preserved_state(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: &str,
    ) -> (Value, Option<Written>) {
        if !ctx.config.hot_reload.preserve_state {
            return (Value::Null, None);
        }
        let path = self.state_path(id);
        let saved = match self.host.read_state(&path) {
            Ok(state) => state,
            Err(e) if state_file::is_unusable_content(&e) => {
                self.set_aside_unusable_state(ctx, id, &path, &e);
                None
            }
            Err(e) => {
                log::warn!("[{id}] ignoring unreadable state file: {e}");
                None
            }
        };
        let written = saved.as_ref().map(|s| Written {
            version: s.version.clone(),
            configuration: s.configuration.clone(),
            runtime_data: s.runtime_data.clone(),
            control: s.control.clone(),
        });
        let saved_data = saved.map_or(Value::Null, |s| s.runtime_data);
        // After a crash of the daemon the plugin's own runtime.json may be newer than the state
        // file: it is the plugin's durable record, so it wins when valid.
        let data = match self
            .host
            .read_runtime(&self.runtime_path(id), MAX_RUNTIME_BYTES)
        {
            state_file::RuntimeRead::Valid(v) => v,
            _ => saved_data,
        };
        (data, written)
    }

    /// A deferred fsync failed: the kernel may have dropped the data it could not write, and a
    /// second fsync could report success for it ("fsyncgate"). Write the file afresh, durably,
    /// from what the daemon holds in memory.
    pub(super) fn rewrite_state(&mut self, p: &mut Plugin) {
        let Some(written) = p.written.take() else {
            return;
        };
        let status = match p.instance {
            Some(_) => "starting",
            None => "stopped",
        };
        if let Err(e) = self.write_state_file(p, &written.version, status, DirSync::Now) {
            log::warn!("[{}] cannot write state file: {e}", p.id);
        }
    }

    /// A state.json that cannot be used is moved aside, not overwritten by the next write: it
    /// may be the only copy of what the plugin had saved (a torn write by hand, a disk fault).
    fn set_aside_unusable_state(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: &str,
        path: &Path,
        error: &StateError,
    ) {
        let kept = match self.host.set_aside_state(path) {
            Ok(aside) => format!("moved it to `{}`", aside.display()),
            Err(e) => format!("could not move it aside ({e})"),
        };
        let reason = format!(
            "{error}; {kept}: the plugin starts with the runtime_data of its runtime.json, if valid"
        );
        log::warn!("[{id}] unusable state file: {reason}");
        emit_state_warning(ctx, id, reason, path);
    }
}
