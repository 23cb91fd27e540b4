/*
 * OHIF 3.13 configuration served by the radiology server at /ohif/app-config.js (appcore/dicom/ohif.py).
 * OHIF reaches the PACS only through the server's DICOMweb proxy (/proxy/dicom/...), which forwards to
 * the --studies URL: the browser needs no access to the PACS and no CORS set-up there. The labeling
 * extension (viewers_config/ohif/extension/labeling.js, a plain ES module) adds its panel to the
 * segmentation mode's left side, beside the study's series (docs/ohif.md). With authentication on,
 * auth.js (listed first: OHIF waits for it) asks for a login before OHIF starts and gives OHIF's
 * requests the token; a DICOMweb request refused with a 401 asks for the login again.
 */
window.config = {
  routerBasename: '/ohif/',
  showStudyList: true,
  extensions: ['/ohif/labeling/auth.js', '/ohif/labeling/labeling.js'],
  httpErrorHandler: error => window.labelingAuth && window.labelingAuth.httpError(error),
  modes: [],
  disableConfirmationPrompts: true,
  customizationService: {
    mode: {
      '@ohif/mode-segmentation': {
        leftPanels: { $unshift: ['labeling.panelModule.labeling'] },
        // Undo and redo of label map edits from the keyboard too (OHIF binds no key to them).
        'ohif.hotkeyBindings': {
          $push: [
            { commandName: 'undo', label: 'Undo', keys: ['ctrl+z'], isEditable: true },
            { commandName: 'redo', label: 'Redo', keys: ['ctrl+y'], isEditable: true },
          ],
        },
      },
    },
  },
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'dicomweb',
  useSharedArrayBuffer: 'FALSE',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'dicomweb',
      configuration: {
        friendlyName: 'PACS (through the MONAI Label server)',
        name: 'pacs',
        wadoUriRoot: '/proxy/dicom/wado',
        qidoRoot: '/proxy/dicom/qido',
        wadoRoot: '/proxy/dicom/wado',
        qidoSupportsIncludeField: true,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        dicomUploadEnabled: false,
        // Ask for pixel data as stored: a PACS without a transcoder (Debian's Orthanc has no GDCM
        // plugin) cannot turn JPEG 2000 into raw pixels; the browser decodes it instead.
        acceptHeader: ['multipart/related; type=application/octet-stream; transfer-syntax=*'],
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        // OHIF's own Export > DICOM SEG > Save stores its default, a Label Map SEG (RLE), which the
        // server takes as a label save (docs/ohif.md). Not the binary 'bitmap' mode: OHIF 3.13.2
        // cannot show a bit-packed SEG it has just stored ("Invalid frame length"), its viewport
        // stayed at "Loading SEG...".
      },
    },
  ],
};
