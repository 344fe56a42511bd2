//! Every file operation of the spool goes through [`Storage`] and [`SegmentWriter`], so the
//! engine runs unchanged on glommio DMA files ([`DmaStorage`]) and on an in-memory file system
//! that injects faults and loses unsynced bytes on a simulated crash ([`MemoryStorage`]).

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::rc::Rc;

/// A directory of segment files.
#[allow(async_fn_in_trait)] // single-threaded (glommio): the futures need not be `Send`
pub trait Storage {
    /// Writer of one segment.
    type Writer: SegmentWriter;
    /// Names of the existing segment files.
    async fn list(&self) -> io::Result<Vec<String>>;
    /// Creates `name` (empty) for appending.
    async fn create(&self, name: &str) -> io::Result<Self::Writer>;
    /// Reads `name` whole (segments are bounded by `segment_bytes_max`).
    async fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// Reads up to `len` bytes of `name` from `offset` (fewer at the end of the file).
    async fn read_range(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// Removes `name`.
    async fn remove(&self, name: &str) -> io::Result<()>;
}

/// Appends to one segment file.
#[allow(async_fn_in_trait)]
pub trait SegmentWriter {
    /// Appends `bytes` (possibly only a prefix on error).
    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Makes everything written so far durable.
    async fn sync(&mut self) -> io::Result<()>;
    /// Closes the file (syncing it).
    async fn close(self) -> io::Result<()>;
}

/// Segments in a directory, written through glommio's `DmaStreamWriter` (O_DIRECT, aligned
/// buffers; `sync` pads the last block and the padding is rewritten by later appends).
#[derive(Debug, Clone)]
pub struct DmaStorage {
    dir: PathBuf,
}

impl DmaStorage {
    /// Uses `dir`, creating it if needed.
    pub fn new(dir: PathBuf) -> io::Result<DmaStorage> {
        std::fs::create_dir_all(&dir)?;
        Ok(DmaStorage { dir })
    }
}

fn glommio_io(error: glommio::GlommioError<()>) -> io::Error {
    io::Error::other(error.to_string())
}

/// A glommio DMA stream writer.
pub struct DmaWriter {
    writer: glommio::io::DmaStreamWriter,
}

impl Storage for DmaStorage {
    type Writer = DmaWriter;

    async fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }

    async fn create(&self, name: &str) -> io::Result<DmaWriter> {
        let file = glommio::io::DmaFile::create(self.dir.join(name))
            .await
            .map_err(glommio_io)?;
        let writer = glommio::io::DmaStreamWriterBuilder::new(file)
            .with_buffer_size(128 << 10)
            .with_write_behind(4)
            .build();
        Ok(DmaWriter { writer })
    }

    async fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        std::fs::read(self.dir.join(name))
    }

    async fn read_range(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        use std::io::{Read, Seek};
        let mut file = std::fs::File::open(self.dir.join(name))?;
        file.seek(io::SeekFrom::Start(offset))?;
        // Read into the buffer's spare capacity: not zeroed first, only written once.
        let mut bytes = Vec::with_capacity(len);
        file.take(len as u64).read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.dir.join(name))
    }
}

impl SegmentWriter for DmaWriter {
    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        futures::AsyncWriteExt::write_all(&mut self.writer, bytes).await
    }

    async fn sync(&mut self) -> io::Result<()> {
        self.writer.sync().await.map(|_| ()).map_err(glommio_io)
    }

    async fn close(mut self) -> io::Result<()> {
        futures::AsyncWriteExt::close(&mut self.writer).await
    }
}

/// A fault [`MemoryStorage`] injects into its next matching operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The next write fails with EIO, writing nothing.
    WriteError,
    /// The next write keeps only its first half (and one byte), then fails with EIO.
    ShortWrite,
    /// The next sync fails with EIO (nothing new becomes durable).
    SyncError,
    /// The next create fails with EIO.
    CreateError,
    /// The next remove fails with EIO.
    RemoveError,
}

#[derive(Debug, Default)]
struct MemFile {
    /// Bytes that survive a crash.
    durable: Vec<u8>,
    /// Bytes written since the last sync.
    volatile: Vec<u8>,
}

#[derive(Debug, Default)]
struct MemFs {
    files: BTreeMap<String, MemFile>,
    faults: VecDeque<Fault>,
}

/// An in-memory directory with crash semantics: [`MemoryStorage::crash`] drops every byte not
/// synced, optionally keeping a torn prefix of the unsynced tail, as a power cut may.
#[derive(Debug, Clone, Default)]
pub struct MemoryStorage {
    fs: Rc<RefCell<MemFs>>,
}

impl MemoryStorage {
    /// Queues a fault for the next matching operation.
    pub fn inject(&self, fault: Fault) {
        self.fs.borrow_mut().faults.push_back(fault);
    }

    /// Loses every unsynced byte; with `torn`, the first `torn` unsynced bytes of each file
    /// survive (a partly written tail).
    pub fn crash(&self, torn: usize) {
        let mut fs = self.fs.borrow_mut();
        for file in fs.files.values_mut() {
            let keep = torn.min(file.volatile.len());
            let kept: Vec<u8> = file.volatile.drain(..keep).collect();
            file.durable.extend(kept);
            file.volatile.clear();
        }
        fs.faults.clear();
    }

    /// Drops faults not yet triggered.
    pub fn clear_faults(&self) {
        self.fs.borrow_mut().faults.clear();
    }

    /// Durable bytes of `name` (tests corrupt them).
    pub fn with_durable<T>(&self, name: &str, f: impl FnOnce(&mut Vec<u8>) -> T) -> Option<T> {
        self.fs
            .borrow_mut()
            .files
            .get_mut(name)
            .map(|file| f(&mut file.durable))
    }

    fn take_fault(&self, matches: impl Fn(Fault) -> bool) -> Option<Fault> {
        let mut fs = self.fs.borrow_mut();
        let position = fs.faults.iter().position(|f| matches(*f))?;
        fs.faults.remove(position)
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(5)
}

/// Writer of one [`MemoryStorage`] file.
pub struct MemWriter {
    storage: MemoryStorage,
    name: String,
}

impl Storage for MemoryStorage {
    type Writer = MemWriter;

    async fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.fs.borrow().files.keys().cloned().collect())
    }

    async fn create(&self, name: &str) -> io::Result<MemWriter> {
        if self.take_fault(|f| f == Fault::CreateError).is_some() {
            return Err(eio());
        }
        self.fs.borrow_mut().files.insert(name.to_string(), MemFile::default());
        Ok(MemWriter {
            storage: self.clone(),
            name: name.to_string(),
        })
    }

    async fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        let fs = self.fs.borrow();
        let file = fs
            .files
            .get(name)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let mut bytes = file.durable.clone();
        bytes.extend_from_slice(&file.volatile);
        Ok(bytes)
    }

    async fn read_range(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let bytes = self.read(name).await?;
        let start = (offset as usize).min(bytes.len());
        Ok(bytes[start..(start + len).min(bytes.len())].to_vec())
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        if self.take_fault(|f| f == Fault::RemoveError).is_some() {
            return Err(eio());
        }
        self.fs.borrow_mut().files.remove(name);
        Ok(())
    }
}

impl SegmentWriter for MemWriter {
    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        let fault = self
            .storage
            .take_fault(|f| matches!(f, Fault::WriteError | Fault::ShortWrite));
        let mut fs = self.storage.fs.borrow_mut();
        let file = fs.files.get_mut(&self.name).ok_or_else(eio)?;
        match fault {
            Some(Fault::WriteError) => Err(eio()),
            Some(_) => {
                file.volatile
                    .extend_from_slice(&bytes[..(bytes.len() / 2 + 1).min(bytes.len())]);
                Err(eio())
            }
            None => {
                file.volatile.extend_from_slice(bytes);
                Ok(())
            }
        }
    }

    async fn sync(&mut self) -> io::Result<()> {
        if self.storage.take_fault(|f| f == Fault::SyncError).is_some() {
            return Err(eio());
        }
        let mut fs = self.storage.fs.borrow_mut();
        let file = fs.files.get_mut(&self.name).ok_or_else(eio)?;
        let volatile = std::mem::take(&mut file.volatile);
        file.durable.extend(volatile);
        Ok(())
    }

    async fn close(mut self) -> io::Result<()> {
        self.sync().await
    }
}
