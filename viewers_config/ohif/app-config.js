/*
 * OHIF configuration served by the radiology server at /ohif/app-config.js (see appcore/dicom/ohif.py),
 * in place of the one inside the monailabel wheel. OHIF reaches the PACS only through the server's
 * DICOMweb proxy (/proxy/dicom/...), which forwards to the --studies URL: the browser needs no
 * access to the PACS and no CORS set-up there.
 */
window.config = {
  routerBasename: '/ohif/',
  showStudyList: true,
  extensions: [],
  modes: [],
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
      },
    },
  ],
};
